"""Dataset adapters: each turns a dataset's published layout into `Example`s of its tasks."""
