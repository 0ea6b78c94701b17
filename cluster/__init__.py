"""How jobs map onto real clusters: stage resources, launcher / KubeRay manifests, runtime_env."""
