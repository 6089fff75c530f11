"""The embedded default: a CLIP trained on the synthetic scene world, and the `vpl demo` report."""
