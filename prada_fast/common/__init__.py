"""What every command shares: flag machinery, exit codes, file writing, environment info."""
