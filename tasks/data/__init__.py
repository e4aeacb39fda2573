"""Getting images in: downloads and archives, decoding and validating images, the TFRecord schema, the
preparation every image gets, the tf.data input pipelines."""
