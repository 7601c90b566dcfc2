"""Task data: datasets from files, the resumable prompt stream, the Countdown toy."""
