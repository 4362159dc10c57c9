"""The core's own generic components, registered through the same hooks as any plugin."""
