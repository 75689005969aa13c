"""isopool provider workers: forked from a preloaded zygote, each holds one fresh SDK client."""
