"""`audit serve`: the review page and its JSON API on 127.0.0.1 (standard library http.server, one thread
per request). Routes: / and /page/NAME (the page's files), /api/sample, /api/next, /api/figure/K,
/image/K/RUN, POST /api/verdict, and /files/PATH for what lies in the audit folder (the report and its
gallery); a path that leads outside the folder is refused."""
from __future__ import annotations

import json
import signal
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from annotate.audit import ANSWERS, ASPECTS, verdicts
from annotate.audit.sample import RUNS_DIR, load_sample
from zoomin_jax import records
from zoomin_jax.errors import UserError

PAGE = Path(__file__).with_name("page")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json", ".md": "text/markdown; charset=utf-8",
          ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_MAX_BODY = 1 << 20  # a verdict with a long note is a few kB


def image_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "application/octet-stream"


class Audit:
    """An audit folder opened for serving: the sample and, per run, a reader of its sampled records."""

    def __init__(self, directory: str | Path):
        from array_record.python.array_record_module import ArrayRecordReader
        self.directory = Path(directory).resolve()
        self.sample = load_sample(self.directory)
        self.ids = [entry["id"] for entry in self.sample["figures"]]
        self.runs = [run["name"] for run in self.sample["runs"]]
        self._readers, self._positions = {}, {}
        for run in self.runs:
            path = self.directory / RUNS_DIR / run / "records-00000-of-00001.array_record"
            if not path.is_file():
                raise UserError(f"{path} is missing: the audit folder is incomplete; make the sample again")
            self._readers[run] = ArrayRecordReader(str(path))
            self._positions[run] = {figure_id: n for n, figure_id in enumerate(records.load_index(path)["ids"])}
            missing = [figure_id for figure_id in self.ids if figure_id not in self._positions[run]]
            if missing:
                raise UserError(f"{path} lacks figure {missing[0]!r} of the sample: make the sample again")
        # One ArrayRecordReader is not documented as safe across threads.
        self._read_lock = threading.Lock()

    def record(self, run: str, figure_id: str) -> dict:
        with self._read_lock:
            n = self._positions[run][figure_id]
            data = self._readers[run].read(n, n + 1)[0]
        return records.decode(data, where=f"run {run} figure {figure_id}")

    def progress(self, reviewer: str) -> dict:
        """Where this reviewer resumes: the first figure of the sample order they have not finished."""
        done = verdicts.finished(verdicts.read(self.directory, self.sample)[0], reviewer)
        following = next((k for k, figure_id in enumerate(self.ids) if figure_id not in done), None)
        return {"next": following, "done": len(done), "total": len(self.ids)}

    def figure(self, k: int, reviewer: str) -> dict:
        figure_id, runs = self.ids[k], []
        for run in self.runs:
            record = self.record(run, figure_id)
            runs.append({
                "name": run, "width": record["width"], "height": record["height"],
                "panels": [{key: panel[key] for key in ("panel_id", "label", "box", "text", "kind")}
                           for panel in record["panels"]],
                "regions": [{"panel_id": region["panel_id"], "box": region["box"], "marker_box": region["marker_box"],
                             "kind": region["marker_kind"], "source": region["source"],
                             "text": region["text_sub"] or region["text_lvlm"]} for region in record["regions"]],
                "warnings": list(record["annotation"].get("warnings", []))})
        mine = [v for v in verdicts.read(self.directory, self.sample)[0]
                if v["figure"] == figure_id and v["reviewer"] == reviewer.strip()]
        return {"index": k, "id": figure_id, "caption": record["caption"],
                "stratum": self.sample["figures"][k]["stratum"], "runs": runs,
                "verdict": mine[-1] if mine else None}


def handler_for(audit: Audit):
    class Handler(BaseHTTPRequestHandler):
        server_version = "annotate-audit"

        def log_message(self, *args):
            pass  # one line per request would bury the one line that says where the page is

        def send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, value, status: int = HTTPStatus.OK) -> None:
            self.send(status, json.dumps(value, ensure_ascii=False).encode("utf-8"), "application/json")

        def refuse(self, status: int, message: str) -> None:
            self.send_json({"error": message}, status)

        def send_file(self, path: Path) -> None:
            self.send(HTTPStatus.OK, path.read_bytes(), _TYPES.get(path.suffix.lower(), "application/octet-stream"))

        def figure_index(self, text: str) -> int | None:
            return int(text) if text.isdigit() and int(text) < len(audit.ids) else None

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
            reviewer = query.get("reviewer", [""])[0]
            parts = path.strip("/").split("/")
            if path == "/":
                return self.send_file(PAGE / "index.html")
            if parts[0] == "page" and len(parts) == 2 and parts[1] in {p.name for p in PAGE.iterdir()}:
                return self.send_file(PAGE / parts[1])
            if path == "/api/sample":
                return self.send_json({"runs": audit.runs, "aspects": ASPECTS, "answers": ANSWERS,
                                       "total": len(audit.ids), "seed": audit.sample["seed"]})
            if path == "/api/next":
                return self.send_json(audit.progress(reviewer))
            if parts[0] == "api" and len(parts) == 3 and parts[1] == "figure":
                k = self.figure_index(parts[2])
                if k is None:
                    return self.refuse(HTTPStatus.NOT_FOUND, f"figure {parts[2]!r} is not one of the sample's "
                                                             f"0..{len(audit.ids) - 1}")
                return self.send_json(audit.figure(k, reviewer))
            if parts[0] == "image" and len(parts) == 3 and parts[2] in audit.runs:
                k = self.figure_index(parts[1])
                if k is None:
                    return self.refuse(HTTPStatus.NOT_FOUND, f"figure {parts[1]!r} is not in the sample")
                data = audit.record(parts[2], audit.ids[k])["image_bytes"]
                return self.send(HTTPStatus.OK, data, image_type(data))
            if parts[0] == "files":
                asked = path[len("/files/"):]
                target = (audit.directory / asked).resolve()
                if not target.is_relative_to(audit.directory):
                    return self.refuse(HTTPStatus.FORBIDDEN, f"refused: {asked!r} is outside the audit folder "
                                                             f"{audit.directory}")
                if not target.is_file():
                    return self.refuse(HTTPStatus.NOT_FOUND, f"{asked!r} is no file of the audit folder")
                return self.send_file(target)
            self.refuse(HTTPStatus.NOT_FOUND, f"{path!r} is not a page of this server; open /")

        def do_POST(self):
            if urllib.parse.urlsplit(self.path).path != "/api/verdict":
                return self.refuse(HTTPStatus.NOT_FOUND, f"{self.path!r} takes no POST; verdicts go to /api/verdict")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= _MAX_BODY:
                return self.refuse(HTTPStatus.BAD_REQUEST, f"a verdict is 1 byte to {_MAX_BODY} bytes of JSON, "
                                                           f"not {length}")
            try:
                verdict = json.loads(self.rfile.read(length).decode("utf-8"))
                line = verdicts.append(audit.directory, verdict, audit.sample)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return self.refuse(HTTPStatus.BAD_REQUEST, f"the verdict is not JSON ({err})")
            except verdicts.VerdictError as err:
                return self.refuse(HTTPStatus.BAD_REQUEST, f"verdict refused: {err}")
            self.send_json({"saved": line} | audit.progress(line["reviewer"]))

    return Handler


def serve(directory: str | Path, port: int = 8765) -> None:
    """Serves until SIGINT or SIGTERM; prints the page's address once listening (port 0: any free one)."""
    audit = Audit(directory)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(audit))
    except OSError as err:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({err.strerror}): pick another --port, or 0 for any "
                        "free one") from None
    server.daemon_threads = True

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"audit: {len(audit.ids)} figures of {', '.join(audit.runs)} at http://127.0.0.1:{server.server_port}/ "
          f"(verdicts in {audit.directory / verdicts.VERDICTS_FILE}; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
