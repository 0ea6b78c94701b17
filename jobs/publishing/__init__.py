"""Publishing: a shard becomes done (its marker, from the writer's part summary); pinned settings, orphans, lease."""
