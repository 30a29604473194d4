"""``tf.data`` adapter: a Feed as a prefetching ``tf.data.Dataset``.

TensorFlow is imported here only, when the adapter is used. The element spec
comes from the server's WELCOME, so nothing is read ahead to find it.
``from_generator`` aliases the 64-byte-aligned slot arrays instead of copying
them; the lease keeps each slot until TensorFlow drops its tensors.
"""

from __future__ import annotations


def element_spec(feed):
    import tensorflow as tf

    spec = feed.spec
    return (tf.TensorSpec((spec.batch_size, *spec.x_shape), tf.as_dtype(spec.x_dtype)),
            tf.TensorSpec((spec.batch_size, *spec.y_shape), tf.as_dtype(spec.y_dtype)))


def as_tf_dataset(feed, prefetch: int = 2):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_generator(feed.generator, output_signature=element_spec(feed))
    return dataset.prefetch(prefetch)
