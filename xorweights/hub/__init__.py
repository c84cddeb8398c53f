"""The Hugging Face Hub: resolving repo ids to local snapshots, the client calls, and publishing."""
