"""The analysis pipeline: decode, preprocess (kernels), infer (backend), postprocess, findings.

The same :class:`Pipeline` serves the DICOM path (a complete study is analysed from the spool),
the gRPC API and the offline ``nidaan analyze`` command.

Nothing is decoded on an association's thread: the SCP stores and records an instance and
answers, and the images are decoded when their study is analysed, several at once (native pixel
data in threads, the Numba kernels run without the GIL; compressed pixel data in the
:class:`~nidaan.server.decode_pool.DecodePool`'s processes, because the codecs hold it). An image
that cannot be decoded then fails alone: ``on_error`` hears of it and the study's other images
are analysed. The gRPC path passes its request's tensors to :meth:`Pipeline.analyse` itself
(``prepared``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from nidaan.core.attributes import text
from nidaan.core.errors import InputError
from nidaan.core.findings import Finding, ImageAnalysis, Outline
from nidaan.kernels import InputLayout, Placement, preprocess, refine_outline, regions, to_host

from .decode import decode, is_image
from .inference import InferenceBackend, is_device_array, stack
from .model_repository import FindingSpec, ModelSpec

if TYPE_CHECKING:
    from .decode_pool import DecodePool

#: Called with an image that cannot be analysed and why; the study's other images go on.
ImageError = Callable[[Dataset, InputError], None]


@dataclass(frozen=True)
class Prepared:
    """One image preprocessed for one model: its (1, H, W) tensor and where the image landed."""

    tensor: np.ndarray
    placement: Placement


def outlines_of(
    heatmap: np.ndarray, spec: FindingSpec, model: ModelSpec, prepared: Prepared
) -> tuple[Outline, ...]:
    """A present finding's regions on one image, strongest first.

    Every connected blob of heatmap cells >= ``spec.region_fraction`` x the heatmap's peak is
    one region, outlined in source pixels. With the sidecar's ``outline`` rule the outline is
    sharpened to the input tensor's pixels (``refine_outline``; the tensor back in display
    values, ``tensor * std + mean``; ``Outline.refined``), and stays the heatmap cells' outline
    where that finds nothing (not refined: a report gives no size in mm from it).
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2 or hm.size == 0 or not np.isfinite(hm).all():
        return ()
    peak = float(hm.max())
    blobs = regions(hm, prepared.placement, peak * spec.region_fraction)
    channel = None
    if spec.outline is not None and blobs:
        tensor = to_host(prepared.tensor)
        i = model.input
        channel = np.asarray(tensor[spec.outline.channel], dtype=np.float64) * i.std + i.mean
    out = []
    for blob in blobs:
        points, refined = blob.outline, None
        if channel is not None and spec.outline is not None:
            refined = refine_outline(
                channel, hm.shape, blob, prepared.placement, spec.outline.above
            )
            points = refined or points
        try:
            out.append(Outline(points, blob.peak, refined=refined is not None))
        except ValueError:  # degenerate after clipping to the image: no area to show
            continue
    return tuple(out)


def layout_of(model: ModelSpec) -> InputLayout:
    """The kernels' view of a model's input spec."""
    i = model.input
    return InputLayout(i.height, i.width, i.resize, i.pad_value, i.mean, i.std, i.windows, i.dtype)


class Pipeline:
    """Routes images to models and turns model outputs into findings."""

    def __init__(
        self,
        models: Sequence[ModelSpec],
        backend: InferenceBackend,
        *,
        kernel_backend: str = "auto",
        decoder: DecodePool | None = None,
        prepare_threads: int = 2,
        observe: Callable[[str, float], None] | None = None,
        on_analysed: Callable[[list[ImageAnalysis]], None] | None = None,
    ) -> None:
        """``observe(stage, seconds)`` hears how long each image's ``decode`` and
        ``preprocess`` took (the metrics' stage histogram); ``on_analysed(analyses)`` hears
        every result :meth:`analyse` returns, whichever entrance asked (drift statistics)."""
        self.models = list(models)
        self.backend = backend
        self.kernel_backend = kernel_backend
        self.decoder = decoder
        self._observe = observe or (lambda stage, seconds: None)
        self._on_analysed = on_analysed
        #: Images of a study prepared at once: decodes wait on the pool's processes and the CPU
        #: kernels release the GIL, so a study's images overlap on every core.
        self._prepare = ThreadPoolExecutor(
            max(1, prepare_threads), thread_name_prefix="nidaan-prepare"
        )
        #: The backend binds GPU arrays by device pointer: keep the kernels' output on the GPU.
        self._device_tensors = bool(getattr(backend, "accepts_device_arrays", False))

    def close(self) -> None:
        """Stop the preparation threads (the decoder belongs to whoever made it)."""
        self._prepare.shutdown(wait=True, cancel_futures=True)

    # --- routing ---------------------------------------------------------------------------------

    def models_for(self, ds: Dataset, allowed: frozenset[str] | None = None) -> list[ModelSpec]:
        """Models whose sidecar accepts this image (modality, body part, view), among
        ``allowed`` (model names a routing rule chose; None = any)."""
        return self.models_accepting(ds, allowed) if is_image(ds) else []

    def models_accepting(
        self, ds: Dataset, allowed: frozenset[str] | None = None
    ) -> list[ModelSpec]:
        """:meth:`models_for` from the header alone (the caller knows the instance is an image)."""
        modality = text(ds, "Modality")
        body_part = text(ds, "BodyPartExamined")
        view = text(ds, "ViewPosition")
        return [
            m
            for m in self.models
            if (allowed is None or m.name in allowed) and m.accepts_image(modality, body_part, view)
        ]

    # --- preparation -----------------------------------------------------------------------------

    def prepare(self, ds: Dataset, allowed: frozenset[str] | None = None) -> dict[str, Prepared]:
        """Decode and preprocess ``ds`` for each model that applies; InputError if it can't."""
        models = self.models_for(ds, allowed)
        if not models:
            return {}
        began = time.monotonic()
        image = decode(ds, self.decoder)
        decoded = time.monotonic()
        self._observe("decode", decoded - began)
        prepared = {}
        for m in models:
            batch, placements = preprocess(
                [image.pixels], [image.transform], layout_of(m), backend=self.kernel_backend
            )
            if self._device_tensors and is_device_array(batch):
                # Stays on the GPU for the CUDA execution provider's IO binding. A device copy:
                # the executor's output is a view of a batch shared with other callers' images,
                # and a cached view would keep all of that batch's memory alive.
                tensor = batch[0].copy()
            else:
                tensor = to_host(batch)[0]
            prepared[m.name] = Prepared(tensor, placements[0])
        self._observe("preprocess", time.monotonic() - decoded)
        return prepared

    # --- analysis --------------------------------------------------------------------------------

    def analyse(
        self,
        datasets: Sequence[Dataset],
        *,
        load_pixels: Callable[[Dataset], Dataset] | None = None,
        allowed: Callable[[Dataset], frozenset[str] | None] | None = None,
        prepared: Mapping[str, dict[str, Prepared]] | None = None,
        on_error: ImageError | None = None,
    ) -> list[ImageAnalysis]:
        """Analyse the images of one study with every applicable model, batched per model.

        ``datasets`` may be headers only (no pixel data) when ``load_pixels(ds)`` returns the
        full dataset; ``allowed(ds)`` gives the model names a routing rule chose for it (None =
        any). ``prepared`` (by SOP Instance UID) gives tensors a caller made itself. An image
        that cannot be decoded or preprocessed raises its InputError, or, with ``on_error``, is
        passed to it and left out while the others are analysed.
        """
        wanted: list[tuple[Dataset, frozenset[str] | None]] = []
        jobs: dict[str, list[tuple[Dataset, Prepared]]] = {}
        ready: dict[str, dict[str, Prepared]] = {}
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            chosen = None if allowed is None else allowed(ds)
            if prepared is not None and uid in prepared:
                ready[uid] = prepared[uid]
            elif self.models_accepting(ds, chosen):
                wanted.append((ds, chosen))

        def prepare_one(item: tuple[Dataset, frozenset[str] | None]) -> dict[str, Prepared]:
            ds, chosen = item
            return self.prepare(ds if load_pixels is None else load_pixels(ds), chosen)

        pending = [(ds, self._prepare.submit(prepare_one, (ds, c))) for ds, c in wanted]
        for ds, future in pending:
            try:
                ready[str(ds.SOPInstanceUID)] = future.result()
            except InputError as exc:
                if on_error is None:
                    for _, f in pending:
                        f.cancel()
                    raise
                on_error(ds, exc)
        for ds in datasets:  # in the study's order, whatever order they were prepared in
            for name, p in ready.get(str(ds.SOPInstanceUID), {}).items():
                jobs.setdefault(name, []).append((ds, p))
        active = [m for m in self.models if jobs.get(m.name)]
        batches = {m.name: stack([p.tensor for _, p in jobs[m.name]]) for m in active}
        if len(active) > 1:
            # Each model has its own queue (and, on Triton, its own instances): run them at once.
            with ThreadPoolExecutor(len(active), thread_name_prefix="nidaan-models") as pool:
                futures = {
                    m.name: pool.submit(self.backend.infer, m, batches[m.name]) for m in active
                }
                all_outputs = {name: f.result() for name, f in futures.items()}
        else:
            all_outputs = {m.name: self.backend.infer(m, batches[m.name]) for m in active}
        results = []
        for model in active:
            items = jobs[model.name]
            outputs = all_outputs[model.name]
            probs = outputs[model.probabilities_output]
            heat = outputs.get(model.heatmap_output) if model.heatmap_output else None
            for n, (ds, p) in enumerate(items):
                findings = []
                for spec in model.findings:
                    prob = float(np.clip(probs[n, spec.index], 0.0, 1.0))
                    outlines: tuple[Outline, ...] = ()
                    if heat is not None and prob >= spec.threshold:
                        outlines = outlines_of(heat[n, spec.index], spec, model, p)
                    findings.append(
                        Finding(spec.label, spec.code, prob, spec.threshold, outlines=outlines)
                    )
                results.append(ImageAnalysis(model.algorithm, ds, tuple(findings)))
        if self._on_analysed is not None and results:
            self._on_analysed(results)
        return results
