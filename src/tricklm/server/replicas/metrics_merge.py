"""Several replicas' Prometheus text as one exposition, each sample labelled with the replica it came from."""

from __future__ import annotations

from collections.abc import Iterable


def merge_expositions(pages: Iterable[tuple[str, str]], label: str = "replica") -> str:
    """(replica, text format page) pairs -> one page: each family's HELP and TYPE once, then every replica's
    samples of it (the format wants a family's samples together)."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, page in pages:
        family = ""
        for line in page.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    known = headers.setdefault(family, [])
                    samples.setdefault(family, [])
                    if len(known) < 2 and line not in known:
                        known.append(line)
                continue
            samples.setdefault(family, []).append(_labelled(line, label, replica))
    out: list[str] = []
    for family, lines in samples.items():
        out.extend(headers.get(family, []))
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


def _labelled(sample: str, label: str, value: str) -> str:
    """`name{a="1"} 2` -> `name{replica="r",a="1"} 2`; `name 2` -> `name{replica="r"} 2`."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    pair = f'{label}="{escaped}"'
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        return f"{sample[:brace]}{{{pair}{'' if rest.startswith('}') else ','}{rest}"
    name, _, tail = sample.partition(" ")
    return f"{name}{{{pair}}} {tail}"
