"""The layer's numerics: the paper's arithmetic in `moments` and `normalize`
(Keras ops only), each backend's arrangements in `tensorflow`, `jax`, `torch` and
`generic`, chosen by `dispatch`."""
