"""What tests and scripts share: starting a real server, free ports, test photos, test weights."""
