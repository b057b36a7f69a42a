"""The ``nidaan`` command: serve, analyze, models, doctor."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nidaan.core.config import Config, load_config
from nidaan.core.errors import ConfigError, NidaanError
from nidaan.core.heap import limit_malloc_arenas, settle_heap


def _config(args: argparse.Namespace) -> Config:
    """The config, with ``kernels.cache_dir`` put into effect.

    Numba fixes each ``cache=True`` kernel's cache directory from ``NUMBA_CACHE_DIR`` when the
    kernel is decorated, i.e. when ``nidaan.kernels`` is imported: so every command loads its
    config before it imports anything that imports the kernels or Numba (this module imports
    neither at the top), and the directory goes into the environment here.
    """
    cfg = load_config(args.config)
    _use_kernel_cache(cfg.kernels.cache_dir)
    return cfg


def _use_kernel_cache(cache_dir: str) -> None:
    """Point ``NUMBA_CACHE_DIR`` at ``cache_dir`` (empty: leave the environment's or Numba's
    default), before the kernels are imported; ``configure_cache`` later checks it took."""
    if not cache_dir:
        return
    path = os.path.abspath(cache_dir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"kernels.cache_dir {path}: cannot create it: {exc.strerror}") from exc
    os.environ["NUMBA_CACHE_DIR"] = path


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM."""
    cfg = _config(args)  # first: it sets NUMBA_CACHE_DIR, which must precede the kernels' import

    from .app import NidaanServer

    limit_malloc_arenas()
    # The handlers go in before anything starts: a SIGINT or SIGTERM that arrives while the
    # server starts, or just after it says it is up, then stops it cleanly, not with a
    # KeyboardInterrupt through whatever line happened to run (an init system or an operator
    # may signal as soon as the ready line appears).
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server = NidaanServer(cfg)
    try:
        server.start(http=not args.no_http, grpc=not args.no_grpc)
        server.decoder.start()  # the codec processes, before the first compressed image waits
        server.results.start()  # and the report builders, before the first report waits
    except BaseException:  # e.g. a taken port (a ConfigError naming it): undo what started
        server.stop()
        raise
    # What the server holds now stays for its life: out of the collector's way (core.heap).
    settle_heap(cfg.inference.gc_young_threshold)
    grpc_port = server.api.port if server.api else "off"
    print(
        f"nidaan: AE {cfg.dicom.ae_title} on DICOM port {server.scp.port}, gRPC port {grpc_port}, "
        f"status and metrics on http://{cfg.http.bind}:{cfg.http.port}/, "
        f"data in {cfg.storage.data_dir}",
        flush=True,
    )
    for line in exposure_warnings(cfg):  # the defaults listen on every interface
        logging.getLogger("nidaan.server").warning("%s", line)
    done.wait()
    server.stop()
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse DICOM files offline and print the findings (JSON lines with --json); with
    ``--remote HOST:PORT``, have a Nidaan server analyse them over gRPC, with the same output."""
    cfg = _config(args)  # first: it sets NUMBA_CACHE_DIR, which must precede the kernels' import
    if args.remote:
        return _analyze_remote(args, cfg)

    from concurrent.futures import ThreadPoolExecutor

    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    from nidaan.kernels import configure_cache

    from .backends import create_backend
    from .model_repository import load_repository
    from .pipeline import Pipeline

    configure_cache(cfg.kernels.cache_dir)  # warns if something imported the kernels too early
    models = load_repository(cfg.models.repository, thresholds=cfg.models.thresholds)
    pipeline = Pipeline(
        models,
        create_backend(cfg.inference, models),
        kernel_backend=cfg.kernels.backend,
    )
    from .validation import files_under  # imports the kernels: after their cache is set

    files = files_under(args.paths)
    failures = 0
    results: list[dict[str, Any]] = []

    def one(path: Path) -> Any:
        try:
            return pipeline.analyse([dcmread(path)])
        except (InvalidDicomError, OSError) as exc:
            return f"{path}: not a readable DICOM file: {exc}"
        except NidaanError as exc:
            return f"{path}: {exc}"

    # Files are analysed by several threads at once, so the models' batchers can batch them.
    pool = ThreadPoolExecutor(cfg.inference.workers)
    outcomes = pool.map(one, files)
    for path in tqdm(
        files, desc="analysing", unit="file", disable=args.quiet or None, file=sys.stderr
    ):
        analyses = next(outcomes)
        if isinstance(analyses, str):
            failures += 1
            print(analyses, file=sys.stderr)
            continue
        for a in analyses:
            results.append(
                {
                    "file": str(path),
                    "model": a.algorithm.name,
                    "version": a.algorithm.version,
                    "not_for_diagnosis": a.algorithm.not_for_diagnosis,
                    "findings": [
                        {
                            "label": f.label,
                            "probability": round(f.probability, 4),
                            "threshold": f.threshold,
                            "present": f.present,
                            "region": None
                            if f.region is None
                            else [
                                round(v, 1)
                                for v in (
                                    f.region.x_min,
                                    f.region.y_min,
                                    f.region.x_max,
                                    f.region.y_max,
                                )
                            ],
                        }
                        for f in a.findings
                    ],
                }
            )
        if not analyses:
            print(f"{path}: no model applies to this instance", file=sys.stderr)
    pool.shutdown()
    pipeline.backend.close()
    _print_analyses(results, as_json=args.json)
    return 1 if failures else 0


def _print_analyses(results: list[dict[str, Any]], *, as_json: bool) -> None:
    """``nidaan analyze``'s output, local or remote: one line (or JSON object) per image."""
    for r in results:
        if as_json:
            print(json.dumps(r))
        else:
            warn = "  [synthetic-trained: NOT FOR DIAGNOSIS]" if r["not_for_diagnosis"] else ""
            print(f"{r['file']}: {r['model']} {r['version']}{warn}")
            for f in r["findings"]:
                mark = "PRESENT" if f["present"] else "absent "
                print(
                    f"  {mark} {f['label']:<10} p={f['probability']:.3f} "
                    f"(threshold {f['threshold']}) region={f['region']}"
                )


def _analyze_remote(args: argparse.Namespace, cfg: Config) -> int:
    """``nidaan analyze --remote``: each file is one AnalyzeStudy call to the server (as each is
    one analysis offline), several at once; needs only the client (``pip install nidaan``)."""
    from concurrent.futures import ThreadPoolExecutor

    from nidaan.client import Client

    from .validation import files_under  # imports the kernels: after their cache is set

    files = files_under(args.paths)
    client = Client(
        args.remote,
        token_file=args.token_file,
        tls_ca=args.tls_ca,
        certificate=args.certificate,
        private_key=args.private_key,
    )

    def one(path: Path) -> Any:
        try:
            return client.analyze_study([path])
        except OSError as exc:
            return f"{path}: not a readable DICOM file: {exc}"
        except NidaanError as exc:
            if "not a readable DICOM" in str(exc):
                return f"{path}: not a readable DICOM file: {exc}"
            return f"{path}: {exc}"

    failures = 0
    results: list[dict[str, Any]] = []
    with client, ThreadPoolExecutor(max(1, cfg.inference.workers)) as pool:
        outcomes = pool.map(one, files)
        try:
            from tqdm import tqdm

            progress = tqdm(
                files, desc="analysing", unit="file", disable=args.quiet or None, file=sys.stderr
            )
        except ModuleNotFoundError:  # a client-only install: no progress bar
            progress = files
        for path in progress:
            response = next(outcomes)
            if isinstance(response, str):
                failures += 1
                print(response, file=sys.stderr)
                continue
            for result in response.results:
                results.append(
                    {
                        "file": str(path),
                        "model": result.algorithm_name,
                        "version": result.model_version,
                        "not_for_diagnosis": result.not_for_diagnosis,
                        "findings": [
                            {
                                "label": f.label,
                                "probability": round(f.probability, 4),
                                # float32 on the wire: the sidecar's value, as offline
                                "threshold": round(f.threshold, 6),
                                "present": f.present,
                                "region": [
                                    round(v, 1)
                                    for v in (
                                        f.region.x_min,
                                        f.region.y_min,
                                        f.region.x_max,
                                        f.region.y_max,
                                    )
                                ]
                                if f.HasField("region")
                                else None,
                            }
                            for f in result.findings
                        ],
                    }
                )
            if not response.results:
                print(f"{path}: no model applies to this instance", file=sys.stderr)
    _print_analyses(results, as_json=args.json)
    return 1 if failures else 0


def cmd_models(args: argparse.Namespace) -> int:
    """List and validate the model repository."""
    from .model_repository import load_repository

    cfg = _config(args)
    models = load_repository(cfg.models.repository, thresholds=cfg.models.thresholds)
    for m in models:
        flag = (
            " (trained on synthetic data: not for diagnosis)"
            if m.algorithm.not_for_diagnosis
            else ""
        )
        print(f"{m.name} {m.version}: {m.display_name}{flag}")
        windows = (
            " windows " + ", ".join(f"{c:g}/{w:g}" for c, w in m.input.windows)
            if m.input.windows
            else ""
        )
        print(
            f"  input {m.input.name} {m.input.channels}x{m.input.height}x{m.input.width} "
            f"({m.input.resize}{windows}), accepts {','.join(m.accepts.modalities)}"
        )
        batching = (
            f"preferred {list(m.preferred_batch_sizes)}, delay {m.max_queue_delay_us} us, "
            f"queue {m.max_queue_size or cfg.inference.max_queue_images} images"
            if m.dynamic_batching
            else "no dynamic batching"
        )
        print(f"  batches up to {m.max_batch_size} ({batching}), {m.instance_count} instance(s)")
        print(f"  model file {m.onnx_path} sha256 {m.algorithm.digest}")
        print(f"  model card {m.card}")
        for f in m.findings:
            site = (
                f" (site override in models.thresholds; sidecar {f.sidecar_threshold})"
                if f.sidecar_threshold is not None
                else ""
            )
            print(
                f"  finding {f.label}: {f.code.scheme} {f.code.value} '{f.code.meaning}', "
                f"threshold {f.threshold}{site}"
            )
    print(f"{len(models)} model(s) valid in {cfg.models.repository}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Run a model over a labelled local set and write the validation report (HTML + JSON)."""
    cfg = _config(args)  # first: it sets NUMBA_CACHE_DIR, which must precede the kernels' import
    from .validation import validate

    result = validate(
        cfg,
        args.model,
        Path(args.labels),
        args.paths,
        Path(args.out),
        target_sensitivity=args.target_sensitivity,
        min_per_class=args.min_per_class,
        progress=not args.quiet,
        log=lambda line: print(f"nidaan: warning: {line}", file=sys.stderr),
    )
    for label, s in result["findings"].items():
        lo_hi = "" if s["auc"] is None else f" ({s['auc_ci95'][0]:.3f}-{s['auc_ci95'][1]:.3f})"
        auc = "-" if s["auc"] is None else f"{s['auc']:.3f}{lo_hi}"
        sens, spec = s["sensitivity"]["value"], s["specificity"]["value"]
        print(
            f"{result['model']} {label}: {s['positives']}+/{s['negatives']}- AUC {auc}, at "
            f"threshold {s['threshold']:g} sensitivity {sens if sens is None else round(sens, 3)} "
            f"specificity {spec if spec is None else round(spec, 3)}"
            + (
                f"; {s['target']['threshold']:.4g} for sensitivity {args.target_sensitivity:g} "
                f"(specificity {s['target']['specificity']['value']:.3f})"
                if s["target"]
                else ""
            )
        )
    print(f"{len(result['failures'])} failed; report in {Path(args.out) / 'validation.html'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the analysed studies as a de-identified dataset with a manifest of AI labels."""
    import datetime as dt

    cfg = _config(args)
    from .export import export

    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            print(
                f"nidaan: error: --since {args.since!r} is not a date (YYYY-MM-DD)", file=sys.stderr
            )
            return 2
    result = export(
        cfg, Path(args.deidentify), since=since, model=args.model, progress=not args.quiet
    )
    print(
        f"{result.studies} studies, {result.files} files de-identified to {result.out} "
        f"(manifest.csv, manifest.json); {len(result.excluded)} image(s) left out for burned-in "
        "annotation" + (" (excluded.csv)" if result.excluded else "")
    )
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    """Show report deliveries; re-send dead letters (works while ``nidaan serve`` runs)."""
    import time

    from nidaan.pacs_bridge.state import StateStore
    from nidaan.pacs_bridge.uids import ref

    cfg = _config(args)
    path = Path(cfg.storage.data_dir) / "state.sqlite3"
    if not path.exists():
        print(f"no state database at {path}", file=sys.stderr)
        return 1
    state = StateStore(path)
    try:
        if args.resend is not None:
            n = state.resend([int(i) for i in args.resend] or None)
            print(f"{n} dead letter(s) queued again")
            return 0
        states = () if args.state == "all" else (args.state,)
        items = state.outbox(*states)
        for i in items:
            wait = max(0.0, i.next_attempt_at - time.time()) if i.state == "queued" else 0.0
            print(
                f"{i.id:6d} {i.state:9s} to {i.destination:16s} report {ref(i.sop_instance_uid)}"
                f"  attempts {i.attempts}"
                + (f", next in {wait:.0f} s" if wait else "")
                + (f"  last error: {i.last_error}" if i.last_error else "")
            )
        print(f"{len(items)} item(s)")
    finally:
        state.close()
    return 0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def exposure_warnings(cfg: Config) -> list[str]:
    """What a node listening beyond loopback accepts from anyone, said at start and by doctor."""
    out = []
    if not _is_loopback(cfg.dicom.bind) and not cfg.dicom.require_known_callers:
        out.append(
            f"DICOM listens on {cfg.dicom.bind}:{cfg.dicom.port} and accepts any caller: set "
            "dicom.require_known_callers = true to accept only the configured [[peers]]"
        )
    if not _is_loopback(cfg.grpc.bind) and not (cfg.grpc.tls or cfg.grpc.tokens_file):
        out.append(
            f"gRPC listens on {cfg.grpc.bind}:{cfg.grpc.port} without authentication: set "
            "grpc.tls = true (mutual TLS) or grpc.tokens_file (bearer tokens)"
        )
    if not _is_loopback(cfg.http.bind) and not (cfg.http.tls or cfg.http.tokens_file):
        out.append(
            f"the status page and metrics listen on {cfg.http.bind}:{cfg.http.port} for anyone: "
            "they show recent studies (shortened UIDs, calling AEs, findings, failures; no "
            "patient names or IDs) and let anyone resend dead letters; set http.tokens_file or "
            'http.tls = true to protect them, or http.bind = "127.0.0.1" to keep them local'
        )
    return out


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check that this machine can run Nidaan with this config."""
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {what}")

    try:
        cfg = _config(args)
        report(True, "configuration is valid")
    except NidaanError as exc:
        report(False, f"configuration: {exc}")
        return 1
    from .model_repository import ModelSpec, load_repository

    models: list[ModelSpec] = []
    try:
        models = load_repository(cfg.models.repository)
        report(True, f"model repository {cfg.models.repository}: {len(models)} valid model(s)")
    except NidaanError as exc:
        report(False, str(exc))
    for module in (
        "pydicom",
        "pynetdicom",
        "highdicom",
        "onnxruntime",
        "numba",
        "libjpeg",
        "openjpeg",
        "rle",
    ):
        try:
            __import__(module)
            report(True, f"python module {module} imports")
        except ImportError as exc:
            report(False, f"python module {module}: {exc}")
    data = Path(cfg.storage.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True)
        probe = data / ".doctor"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(data).free / 2**30
        report(free > 1.0, f"data dir {data} is writable, {free:.1f} GiB free")
    except OSError as exc:
        report(False, f"data dir {data}: {exc.strerror}")
    for name, port, host, key in (
        ("DICOM", cfg.dicom.port, cfg.dicom.bind, "dicom.port"),
        ("HTTP", cfg.http.port, cfg.http.bind, "http.port"),
        ("gRPC", cfg.grpc.port, cfg.grpc.bind, "grpc.port"),
    ):
        if _port_free(host, port):
            report(True, f"{name} port {port} on {host} is free ({key})")
        else:
            report(
                False,
                f"{name} port {port} on {host} is taken: another program (or a running "
                f"nidaan serve) listens there; stop it or set {key}",
            )
    for line in exposure_warnings(cfg):
        print(f"[warn] {line}")
    from nidaan.pacs_bridge.scu import echo
    from nidaan.pacs_bridge.tls import client_context

    for peer in cfg.peers:
        try:
            context = client_context(cfg.dicom) if peer.tls else None
            why = echo(
                calling_ae=cfg.dicom.ae_title,
                peer_ae=peer.ae_title,
                host=peer.host,
                port=peer.port,
                timeout_s=min(10.0, cfg.dicom.network_timeout_s),
                ssl_context=context,
            )
        except (OSError, ValueError) as exc:
            why = f"TLS set-up failed: {exc}"
        where = f"peer {peer.ae_title} at {peer.host}:{peer.port}{' (TLS)' if peer.tls else ''}"
        report(not why, f"{where} answers C-ECHO" if not why else f"{where}: {why}")
    from .inference import onnxruntime_providers

    try:
        report(True, f"ONNX Runtime providers: {', '.join(onnxruntime_providers('auto'))}")
    except NidaanError as exc:
        report(False, str(exc))
    if cfg.inference.backend == "triton":
        from .inference import TritonBackend

        try:
            triton = TritonBackend(cfg.inference, models)
            shm = ", ".join(triton.shared_memory) or "none"
            triton.close()
            report(
                True,
                f"Triton at {cfg.inference.triton_url} serves all {len(models)} model(s); "
                f"shared memory: {shm}",
            )
        except NidaanError as exc:
            report(False, str(exc))
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nidaan", description=__doc__)
    parser.add_argument(
        "--config",
        help="TOML config file (NIDAAN_* env vars override it)",
        default=os.environ.get("NIDAAN_CONFIG"),
    )
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the DICOM node (the main job)")
    p.add_argument("--no-http", action="store_true", help="do not serve metrics over HTTP")
    p.add_argument("--no-grpc", action="store_true", help="do not serve the gRPC API")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("analyze", help="analyse DICOM files or folders offline")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per analysed image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="have the Nidaan server there analyse the files over gRPC (same output)",
    )
    p.add_argument(
        "--token-file", help="with --remote: a file holding the bearer token (grpc.tokens_file)"
    )
    p.add_argument("--tls-ca", help="with --remote: verify the server's TLS certificate (PEM)")
    p.add_argument("--certificate", help="with --remote: this client's certificate (PEM)")
    p.add_argument("--private-key", help="with --remote: this client's private key (PEM)")
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("models", help="list and validate the model repository")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("validate", help="validate a model on a labelled local set (HTML + JSON)")
    p.add_argument("paths", nargs="+", help="DICOM files or folders")
    p.add_argument("--model", required=True, help="the model's repository name")
    p.add_argument(
        "--labels",
        required=True,
        help="CSV: sop_instance_uid or study_instance_uid, "
        "a column per finding (1/0), other columns are subgroups",
    )
    p.add_argument("--out", default="validation", help="report folder (default: validation)")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        help="find the threshold that reaches this sensitivity (default 0.90)",
    )
    p.add_argument(
        "--min-per-class",
        type=int,
        default=30,
        help="fewer positives or negatives than this: the set is called too small",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("export", help="write analysed studies as a de-identified dataset")
    p.add_argument(
        "--deidentify",
        metavar="OUT",
        required=True,
        help="folder for the de-identified files and the manifest",
    )
    p.add_argument("--since", help="only studies received since this date (YYYY-MM-DD)")
    p.add_argument("--model", help="only studies this model has findings in")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("outbox", help="report deliveries; re-send dead letters")
    p.add_argument("--state", default="all", choices=["all", "queued", "delivered", "dead"])
    p.add_argument(
        "--resend", nargs="*", metavar="ID", help="queue dead letters again (all, or these ids)"
    )
    p.set_defaults(func=cmd_outbox)
    p = sub.add_parser("doctor", help="check this machine and config")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nidaan`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Third-party INFO logs name UIDs of the objects they handle; Nidaan's own logs use digests.
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except NidaanError as exc:
        print(f"nidaan: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # Installed without extras, the distribution is the client only (``nidaan.client``).
        if exc.name and exc.name.split(".")[0] in _SERVER_MODULES:
            print(
                f"nidaan: error: {args.command} needs the server's dependencies ({exc.name} is "
                "not installed): pip install 'nidaan[server]'",
                file=sys.stderr,
            )
            return 2
        raise


#: Third-party modules of the ``server`` extra (a missing one means a client-only install).
_SERVER_MODULES = frozenset(
    {"numpy", "numba", "pydicom", "pynetdicom", "highdicom", "onnxruntime", "tritonclient",
     "prometheus_client", "grpc_health", "grpc_reflection", "tqdm", "pylibjpeg"}
)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
