"""The analysis pipeline: decode, preprocess (kernels), infer (backend), postprocess, findings.

The same :class:`Pipeline` serves the DICOM path (the SCP inspects each instance on arrival and
the study is analysed on completion), the gRPC API and the offline ``nidaan analyze`` command.

Images are decoded once. On the DICOM path, the SCP's inspection decodes and preprocesses an
image on arrival into the model tensors, which wait in a bounded in-memory cache (the DICOM
route's staging area) until the study is complete; an image that fell out of the cache (or
arrived before a restart) is decoded again from the spool. A cached entry is used only when it
holds exactly the models the analysis asks for, so a hit can never change which models run. The
gRPC path passes its request's tensors to :meth:`Pipeline.analyse` itself (``prepared``) and
never touches the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from nidaan.core.attributes import text
from nidaan.core.findings import BoundingBox, Finding, ImageAnalysis
from nidaan.kernels import InputLayout, Placement, peak_region, preprocess, to_host

from .decode import decode, is_image
from .inference import InferenceBackend, is_device_array, stack
from .model_repository import ModelSpec


@dataclass(frozen=True)
class Prepared:
    """One image preprocessed for one model: its (1, H, W) tensor and where the image landed."""

    tensor: np.ndarray
    placement: Placement


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
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.models = list(models)
        self.backend = backend
        self.kernel_backend = kernel_backend
        self._cache: OrderedDict[str, dict[str, Prepared]] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._lock = threading.Lock()
        #: The backend binds GPU arrays by device pointer: keep the kernels' output on the GPU.
        self._device_tensors = bool(getattr(backend, "accepts_device_arrays", False))

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
        image = decode(ds)
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
        return prepared

    def inspect(self, ds: Dataset, allowed: frozenset[str] | None = None) -> bool:
        """SCP hook: prepare an arriving instance and keep the tensors for its study's analysis.

        Returns whether the instance is an image some model will analyse.
        """
        prepared = self.prepare(ds, allowed)
        if prepared:
            self._remember(str(ds.SOPInstanceUID), prepared)
        return bool(prepared)

    def _remember(self, sop_uid: str, prepared: dict[str, Prepared]) -> None:
        size = sum(p.tensor.nbytes for p in prepared.values())
        with self._lock:
            old = self._cache.pop(sop_uid, None)
            if old is not None:
                self._cache_bytes -= sum(p.tensor.nbytes for p in old.values())
            self._cache[sop_uid] = prepared
            self._cache_bytes += size
            while self._cache_bytes > self._cache_limit and self._cache:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= sum(p.tensor.nbytes for p in evicted.values())

    @property
    def cached_bytes(self) -> int:
        """Bytes of preprocessed tensors waiting for their study's analysis."""
        with self._lock:
            return self._cache_bytes

    def _take(self, sop_uid: str) -> dict[str, Prepared] | None:
        with self._lock:
            prepared = self._cache.pop(sop_uid, None)
            if prepared is not None:
                self._cache_bytes -= sum(p.tensor.nbytes for p in prepared.values())
            return prepared

    # --- analysis --------------------------------------------------------------------------------

    def analyse(
        self,
        datasets: Sequence[Dataset],
        *,
        load_pixels: Callable[[Dataset], Dataset] | None = None,
        allowed: Callable[[Dataset], frozenset[str] | None] | None = None,
        prepared: Mapping[str, dict[str, Prepared]] | None = None,
    ) -> list[ImageAnalysis]:
        """Analyse the images of one study with every applicable model, batched per model.

        ``datasets`` may be headers only (no pixel data) when ``load_pixels(ds)`` can return the
        full dataset for an image whose tensors are no longer cached; ``allowed(ds)`` gives the
        model names a routing rule chose for it (None = any). ``prepared`` (by SOP Instance UID)
        gives tensors a caller made itself, in place of the arrival cache.
        """
        jobs: dict[str, list[tuple[Dataset, Prepared]]] = {}
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            chosen = None if allowed is None else allowed(ds)
            wanted = {m.name for m in self.models_accepting(ds, chosen)}
            ready = prepared.get(uid) if prepared is not None else self._take(uid)
            if ready is None or set(ready) != wanted:
                # Not cached, or cached for other models (another route's choice): prepare
                # for exactly the models this analysis runs.
                ready = (
                    self.prepare(ds if load_pixels is None else load_pixels(ds), chosen)
                    if wanted
                    else {}
                )
            for name, p in ready.items():
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
                    region = None
                    if heat is not None and prob >= spec.threshold:
                        box = peak_region(heat[n, spec.index], p.placement, spec.region_fraction)
                        region = BoundingBox(*box) if box else None
                    findings.append(Finding(spec.label, spec.code, prob, spec.threshold, region))
                results.append(ImageAnalysis(model.algorithm, ds, tuple(findings)))
        return results
