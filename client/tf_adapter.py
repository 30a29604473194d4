"""``tf.data`` adapter: a Feed as a prefetching ``tf.data.Dataset``.

TensorFlow is imported here only, when the adapter is used. The element spec
comes from the server's WELCOME, so nothing is read ahead to find it: one
``TensorSpec`` per field, nested as the feed's structure nests its batches.
``from_generator`` aliases the 64-byte-aligned slot arrays instead of copying
them; the lease keeps each slot until TensorFlow drops its tensors.
"""

from __future__ import annotations


def element_spec(feed) -> tuple:
    """``(x_spec, y_spec)`` or ``(x_spec, y_spec, w_spec)``; a role of several fields is a dict
    of specs by field name."""
    import tensorflow as tf

    spec = feed.spec
    tensors = {field.name: tf.TensorSpec((spec.batch_size, *field.shape), tf.as_dtype(field.dtype), name=field.name)
               for field in spec.fields}
    return spec.structure.assemble(tensors)


def as_tf_dataset(feed, prefetch: int = 2):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_generator(feed.generator, output_signature=element_spec(feed))
    return dataset.prefetch(prefetch)
