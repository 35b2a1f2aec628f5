"""Data: synthetic holograms, TIFF data sets and manifests, tile plans, rank sharding, tf.data pipelines."""
