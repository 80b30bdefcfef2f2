"""Data layer shared by the API and the scheduler. Imports no Flask."""
