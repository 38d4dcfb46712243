"""`alm corpus verify DIR` and `alm corpus finalize DIR`: check a corpus completely, rebuild its manifest.

    alm corpus verify corpora/desta            # manifest, shard paths, sizes, sha256, record counts
    alm corpus verify corpora/desta --records  # ... and parse every record and decode its audio
    alm corpus finalize corpora/desta          # rebuild manifest.json from the shards' .done.json files

`verify` prints one line per damaged shard and exits 1 if there is any (or, with --records, any bad
record); shards that pass are remembered in `.verified.json`, so the next `Corpus` open skips their hash.
"""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    c = sub.add_parser("corpus", help="check a corpus (every shard's size, sha256, records) or rebuild its manifest")
    csub = c.add_subparsers(dest="corpus_command", metavar="ACTION")
    v = csub.add_parser("verify", help="check the manifest and every shard (size, sha256, record count)")
    v.add_argument("corpus", help="corpus directory")
    v.add_argument("--records", action="store_true", help="also parse every record and decode its audio")
    v.add_argument("--max-audio-seconds", type=float, default=None,
                   help="with --records: longest clip accepted (default 600)")
    v.set_defaults(func=_verify)
    f = csub.add_parser("finalize", help="rebuild manifest.json from the finished shards' .done.json files")
    f.add_argument("corpus", help="corpus directory")
    f.set_defaults(func=_finalize)
    c.set_defaults(func=lambda a: (c.print_help(), 2)[1])


def _verify(args) -> int:
    from alm_jax.data.corpus import verify_corpus
    kw = {} if args.max_audio_seconds is None else {"max_audio_seconds": args.max_audio_seconds}
    report = verify_corpus(args.corpus, records=args.records, **kw)
    for problem in report["problems"]:
        print(f"alm corpus verify: {problem}", file=sys.stderr)
    bad = report["bad"]
    summary = {"corpus": report["corpus"], "shards": report["shards"], "damaged_shards": len(report["problems"]),
               "records": report["records"]}
    if args.records:
        summary.update(records_checked=bad["seen"], bad_records=bad["bad"])
        for kind, examples in bad["examples"].items():
            print(f"alm corpus verify: bad record ({kind}): {examples[0]}", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if report["problems"] or bad["bad_total"] else 0


def _finalize(args) -> int:
    from alm_jax.data.corpus import finalize_manifest
    m = finalize_manifest(args.corpus)
    print(json.dumps({"corpus": args.corpus, "shards": len(m["shards"]), "records": m["total_records"]}))
    return 0
