"""Reads TFRecord files with TensorFlow's own reader and prints the examples as JSON lines.

Run with the TensorFlow venv's python (scripts/test.sh makes it): it must not import this
project. Used by the tests as an independent check of the files the pipeline writes:
`tf.data.TFRecordDataset` (with gzip) frames and checksums, `tf.train.Example` parses.
"""
import json
import sys

import tensorflow as tf


def main(paths):
    for path in paths:
        compression = "GZIP" if path.endswith(".gz") else ""
        for raw in tf.data.TFRecordDataset([path], compression_type=compression):
            ex = tf.train.Example.FromString(raw.numpy())
            out = {}
            for name, feature in ex.features.feature.items():
                kind = feature.WhichOneof("kind")
                values = list(getattr(feature, kind).value) if kind else []
                if kind == "bytes_list":
                    values = [v.decode("utf-8") for v in values]
                out[name] = {"kind": kind, "value": values}
            print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
