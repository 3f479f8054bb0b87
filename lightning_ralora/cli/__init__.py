"""The console scripts (`lightning-ralora-*`): each parses its command line and calls the layers below."""
