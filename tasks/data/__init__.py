"""Getting images in: downloads and archives, decoding and validating images, the TFRecord schema, the tf.data input pipelines."""
