"""Output: results tables, completion records and the output lease."""
