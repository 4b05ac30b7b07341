"""Input data, read top-down: sources (sources.py; image_folder.py, tfds_source.py,
records.py) -> decoding (images.py) -> per-example transforms (transforms.py, augment.py) ->
grain pipelines (pipeline.py); skip_corrupt (corrupt.py), on-device mixup / cutmix
(mixing.py), the ArrayRecord converter (`python -m jaxcls.data.convert`) and the image
exporter (`python -m jaxcls.data.export_images`).

Import the module you need (`from jaxcls.data import pipeline`): this package imports
nothing, so using one part never loads the others.
"""
