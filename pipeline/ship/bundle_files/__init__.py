"""Files copied into every bundle (pipeline.ship.bundle), shipped with the package as its data.

`predict.py` runs on the device without this project: it imports only numpy, Pillow and the bundle's runtime.
Nothing here is imported by the project itself, except by `validate`, which loads the bundle's own copy of
predict.py to check that its preprocessing reproduces the bundle's reference inputs.
"""
