"""The deploy as its stages, each a plain function of one context returning plain data:

    prepare   checkpoint, data sources, the disjoint split, calibration and control sets, gates  → Context
    export    the checked ONNX export, and the outlier-smoothed source of the INT8 builds         → Sources
    build     every precision, and the INT8 recipes compared with the default (cached by key)     → Built
    decide    accuracy-bounded fallback and the target's own accuracy control (control split)   → Decision
    validate  accuracy on the evaluation split, latency interleaved, recipes compared            → Validation
    gates     the measured figures against gates.toml                                           → verdicts
    report    everything above as one plain dict, published atomically with the artifacts       → report dir

`pipeline.deploy` reads as that sequence; `sensitivity` and `bench` share `prepare`, `export` and `build`.
"""
