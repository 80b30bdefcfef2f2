"""The NexMDM operator console (Textual). ``python -m console``; the data side is console.sources."""
