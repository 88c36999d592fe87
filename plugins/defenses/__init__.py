"""Built-in defenses, one small module each. Importing a module registers its defense."""
