"""What minimoe does besides running a model: the ``minimoe`` command (:mod:`.cli`), benchmarks against
transformers and the CPU's roofline (:mod:`.bench`, :mod:`.roofline`), and upcycling a dense checkpoint into
an MoE (:mod:`.upcycle`)."""
