"""Reading an X-Mark marker file (``owner/generator.pt``) back, through the safe model reader.

The marker and its file format live in :mod:`watermark.xmark.marker` (framework-free); building
its networks from a file someone else may have touched needs :mod:`models` (the generator class
and the factory table of :mod:`models.safe_reader`), so the reader lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.generator import ConditionalUNetGenerator
from models.safe_reader import ModelFileError, build_model, config_of, read_model_file, validate_kwargs
from watermark.xmark.marker import MARKER_FORMAT, MARKER_VERSION, XMarkMarker


class MarkerError(ModelFileError):
    """A marker (generator) file cannot be used; the message names the file and field."""


def load_marker(path: str | Path, factories: Sequence[str] = ()) -> XMarkMarker:
    """Read a marker file written by :meth:`watermark.xmark.marker.XMarkMarker.save`.

    Read by :mod:`models.safe_reader` (``weights_only=True``): ``generator_config`` must be
    plain keyword arguments of :class:`ConditionalUNetGenerator`, ``surrogate_config`` an
    exact factory of the table (``factories`` only adds operator-trusted ones); nothing
    nested is built and Hydra never sees the file.

    Raises:
        MarkerError: missing/corrupt file, wrong format, a refused config (untrusted factory,
            nested or Hydra-special entry), or weights that do not fit their config (all named).
    """
    path = Path(path)
    bundle = read_model_file(path, "marker (generator) file", MarkerError)
    if bundle.get("format") != MARKER_FORMAT:
        raise MarkerError(f"{path}: field 'format' must be {MARKER_FORMAT!r} (an X-Mark owner/generator.pt)")
    if bundle.get("version") != MARKER_VERSION:
        raise MarkerError(f"{path}: field 'version' {bundle.get('version')!r} is not supported")
    generator_config = validate_kwargs(bundle.get("generator_config"), path, "generator_config", MarkerError)
    try:
        generator = ConditionalUNetGenerator(**generator_config)
        generator.load_state_dict(bundle["generator_state"])
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as err:
        raise MarkerError(f"{path}: field 'generator_state' does not fit 'generator_config' "
                          f"({type(err).__name__}: {str(err)[:300]})") from None
    surrogate = None
    config = bundle.get("surrogate_config")
    if config is not None:
        config = config_of(config, path, "surrogate_config", tuple(factories), error=MarkerError)
        surrogate = build_model(config, path, "surrogate_config", tuple(factories), MarkerError)
        try:
            surrogate.load_state_dict(bundle["surrogate_state"])
        except Exception as err:
            raise MarkerError(f"{path}: field 'surrogate_state' does not fit 'surrogate_config' "
                              f"({type(err).__name__}: {str(err)[:300]})") from None
    try:
        return XMarkMarker(generator, surrogate, generator_config, config, bundle["image_size"],
                           bool(bundle.get("sign_correction", True)))
    except (KeyError, ValueError, TypeError) as err:
        raise MarkerError(f"{path}: {err}") from None
