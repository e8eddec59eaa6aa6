"""Worker handler modules used by the kameo test suite (imported inside worker processes)."""
