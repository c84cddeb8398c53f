"""The delta format: the manifest, the frame kernel and codings, and the per-frame pipeline."""
