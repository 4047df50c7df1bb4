"""HTTP routes: each parses, calls the request flow, and shapes the answer."""
