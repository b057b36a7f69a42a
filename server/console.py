"""The status page's working part, for a PACS administrator: recent studies with filters,
failures, the quarantine, dead letters with a resend button, and the peers.

No patient data is shown: studies are named by a shortened Study Instance UID (enough to find
one in the PACS beside its calling AE and times), findings by label and probability, reasons by
the messages Nidaan wrote. Everything is HTML-escaped; the page refreshes itself.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from pydicom.uid import UID

__all__ = ["modality_of", "quarantine_entries", "sections", "short_uid"]

#: Seconds between the page's own refreshes.
REFRESH_S = 10

#: SOP class keyword prefixes and the modality an administrator knows them by.
_MODALITIES = (
    ("ComputedRadiography", "CR"),
    ("DigitalXRay", "DX"),
    ("DigitalMammography", "MG"),
    ("EnhancedCT", "CT"),
    ("CT", "CT"),
    ("EnhancedMR", "MR"),
    ("MR", "MR"),
    ("UltrasoundMultiFrame", "US"),
    ("Ultrasound", "US"),
    ("SecondaryCapture", "SC"),
    ("Segmentation", "SEG"),
    ("GrayscaleSoftcopyPresentationState", "PR"),
    ("Comprehensive3DSR", "SR"),
    ("EnhancedSR", "SR"),
    ("BasicTextSR", "SR"),
    ("PositronEmission", "PT"),
    ("NuclearMedicine", "NM"),
)


def short_uid(uid: str) -> str:
    """A UID shortened for a table: its start and its end (``1.2.840…4567``)."""
    return uid if len(uid) <= 16 else f"{uid[:7]}…{uid[-6:]}"


def modality_of(sop_class_uid: str) -> str:
    """The modality a SOP class stands for (CR, CT, ...), or the class's name."""
    keyword = UID(sop_class_uid).keyword or ""
    for prefix, modality in _MODALITIES:
        if keyword.startswith(prefix):
            return modality
    return keyword or sop_class_uid


def quarantine_entries(folder: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest quarantine entries: when, why, the status sent, the stage, the size, and
    whether the bytes were kept (from each entry's JSON; the object itself is not read)."""
    out = []
    for path in sorted(folder.glob("*.json"), reverse=True)[:limit]:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out.append(
            {
                "entry": path.stem,
                "received_at": info.get("received_at"),
                "reason": str(info.get("reason", "")),
                "status": str(info.get("status", "")),
                "stage": str(info.get("stage", "admission")),
                "size": info.get("size"),
                "kept": bool(info.get("kept", False)),
            }
        )
    return out


def _when(t: float | None) -> str:
    return "" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(rows: list[list[Any]], head: list[str], empty: str) -> str:
    if not rows:
        return f"<p class=none>{html.escape(empty)}</p>"
    cells = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows
    )  # cells are escaped (or built from escaped parts) by the callers
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><tr>{header}</tr>{cells}</table>"


def _e(value: Any) -> str:
    return html.escape(str(value))


def sections(console: dict[str, Any]) -> str:
    """The page's working sections for :meth:`NidaanServer.console`'s data."""
    f = console["filters"]

    def options(values: list[str], chosen: str) -> str:
        return "".join(
            f'<option value="{_e(v)}"{" selected" if v == chosen else ""}>{_e(v or "any")}</option>'
            for v in ["", *values]
        )

    filters = (
        "<form method=get class=filters>state <select name=state id=filter-state>"
        f"{options(f['states'], f['state'])}</select> calling AE <select name=ae id=filter-ae>"
        f"{options(f['calling_aes'], f['calling_ae'])}</select> <button>show</button></form>"
    )
    studies = _table(
        [
            [
                f"<code>{_e(s['study'])}</code>",
                _e(s["modality"]),
                _e(s["calling_ae"]),
                _e(s["instances"]),
                _e(_when(s["received_at"])),
                _e(_when(s["updated_at"])),
                f"<span class=state-{_e(s['state'])}>{_e(s['state'])}</span>",
                _e(s["findings"]),
                _e(", ".join(f"{n} {k}" for k, n in s["deliveries"].items() if n) or "none"),
                _e(s["reason"]),
            ]
            for s in console["studies"]
        ],
        [
            "study",
            "modality",
            "from",
            "instances",
            "received",
            "last change",
            "state",
            "findings",
            "deliveries",
            "reason",
        ],
        "no study matches",
    )
    failures = _table(
        [
            [f"<code>{_e(x['study'])}</code>", _e(x["calling_ae"]), _e(x["reason"])]
            for x in console["failures"]
        ],
        ["study", "from", "why"],
        "no failed study",
    )
    quarantine = _table(
        [
            [
                _e(_when(q["received_at"])),
                _e(q["stage"]),
                _e(q["status"]),
                _e(q["reason"]),
                _e(q["size"]),
                "kept" if q["kept"] else "reason only",
            ]
            for q in console["quarantine"]
        ],
        ["when", "stage", "status", "why", "bytes", "object"],
        "the quarantine is empty",
    )
    dead = _table(
        [
            [
                f"<code>{_e(d['study'])}</code>",
                f"<code>{_e(d['object'])}</code>",
                _e(d["destination"]),
                _e(d["attempts"]),
                _e(d["error"]),
                f'<form method=post action="/resend"><input type=hidden name=id '
                f'value="{_e(d["id"])}"><button class=resend id="resend-{_e(d["id"])}">'
                "resend</button></form>",
            ]
            for d in console["dead_letters"]
        ],
        ["study", "object", "to", "attempts", "last error", ""],
        "no dead letter",
    )
    peers = _table(
        [
            [
                _e(p["ae_title"]),
                _e(p["address"] + (" (TLS)" if p["tls"] else "")),
                _e(", ".join(p["objects"])),
                _e(p["language"]),
                f"<span class=peer-echo>{_e(p['echo'])}</span> {_e(_when(p['echo_at']))}",
                f"{_e(p['delivery'])} {_e(_when(p['delivery_at']))}",
            ]
            for p in console["peers"]
        ],
        ["AE title", "address", "objects", "language", "last C-ECHO", "last delivery"],
        "no peer is configured",
    )
    return (
        f"<h2>Recent studies</h2>{filters}{studies}"
        f"<h2>Dead letters</h2>{dead}"
        f"<h2>Failed studies</h2>{failures}"
        f"<h2>Quarantine</h2>{quarantine}"
        f"<h2>Peers</h2>{peers}"
    )
