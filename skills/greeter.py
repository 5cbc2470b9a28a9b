"""Greeter: recognise an enrolled driver on approach, greet them by name, apply their presets.

Privacy: enrolment needs explicit consent; only the face template (a 128-d embedding) is stored, encrypted with
AES-256-GCM (key from config or INCAR_PROFILE_KEY, never stored with the data), with the profile id as associated
data so a template cannot be moved to another profile. The image is never stored. Deleting a profile removes
its row, its greeting events, and (secure_delete) the freed database pages.
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from incar.v1 import common_pb2, skills_pb2
from service.cameras.frames import FrameError, decode_checked
from service.perception.types import FrameAnalysis
from service.runtime.scheduler import JobClass
from skills.base import (FaceEmbedder, InvalidRequestError, NotFoundError, PreconditionError, Skill,
                         SkillContext, area, is_moving, narrate)
from skills.config import GreeterConfig

log = structlog.get_logger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE greeter_profiles (
        profile_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        enrolled_time REAL NOT NULL,
        key_fob_id TEXT NOT NULL DEFAULT '',
        preferences_json TEXT NOT NULL DEFAULT '',
        template BLOB                        -- nonce || AES-GCM(embedding float32), NULL: fob-only profile
    );
    """,
]

EMBEDDING_DIM = 128
NONCE_BYTES = 12


class TemplateCipher:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, profile_id: str, embedding: np.ndarray) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        plain = np.asarray(embedding, dtype="<f4").tobytes()
        return nonce + self._aead.encrypt(nonce, plain, profile_id.encode())

    def open(self, profile_id: str, blob: bytes) -> np.ndarray:
        try:
            plain = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], profile_id.encode())
        except InvalidTag:
            raise PreconditionError(f"profile {profile_id}: template does not decrypt with the configured key") \
                from None
        return np.frombuffer(plain, dtype="<f4").astype(np.float32)


class Greeter(Skill):
    name = "greeter"

    def __init__(self, ctx: SkillContext, config: GreeterConfig | None = None,
                 face_embedder: FaceEmbedder | None = None):
        super().__init__(ctx)
        self.config = config or GreeterConfig()
        self.budget_s = self.config.budget_seconds
        self.face_embedder = face_embedder
        key = self.config.resolved_key()
        self.cipher = TemplateCipher(key) if key else None
        ctx.db.register_migrations("greeter", MIGRATIONS)
        self._templates: dict[str, tuple[str, np.ndarray]] | None = None   # profile_id -> (name, embedding)
        self._last_greeted: dict[str, float] = {}
        self._attempts = 0
        self._window_start = 0.0
        self._gave_up = False

    # ------------------------------------------------------------------ profiles
    def _require_cipher(self) -> TemplateCipher:
        if self.cipher is None:
            raise PreconditionError("no profile key: set skills.greeter.profile_key or INCAR_PROFILE_KEY")
        return self.cipher

    async def enroll(self, name: str, consent: bool, *, image: np.ndarray | None = None, key_fob_id: str = "",
                     preferences_json: str = "") -> skills_pb2.Profile:
        name = name.strip()
        if not consent:
            raise InvalidRequestError("consent: enrolment stores a face template and needs explicit consent")
        if not name or len(name) > 64:
            raise InvalidRequestError("name: expected 1..64 characters")
        if preferences_json:
            try:
                json.loads(preferences_json)
            except ValueError as exc:
                raise InvalidRequestError(f"preferences_json: not JSON ({exc})") from None
        if len(key_fob_id) > 128:
            raise InvalidRequestError("key_fob_id: longer than 128 characters")
        if image is None and not key_fob_id:
            raise InvalidRequestError("face_source: give a camera_id or an image (or a key_fob_id for a "
                                      "fob-only profile)")
        embedding = None
        if image is not None:
            cipher = self._require_cipher()
            embedding = self._embed_one(image)
        profile_id = f"prof-{uuid.uuid4().hex[:16]}"
        template = cipher.seal(profile_id, embedding) if embedding is not None else None
        now = self.now
        with self.ctx.db.transaction() as tx:
            tx.execute("INSERT INTO greeter_profiles(profile_id, name, enrolled_time, key_fob_id, preferences_json,"
                       " template) VALUES(?,?,?,?,?,?)",
                       (profile_id, name, now, key_fob_id, preferences_json, template))
        self._templates = None
        self.emit("enrolled", common_pb2.SEVERITY_INFO, f"Profile enrolled for {name}",
                  {"profile_id": profile_id, "face": embedding is not None, "key_fob": bool(key_fob_id)})
        return self._profile(profile_id)

    def _embed_one(self, image: np.ndarray) -> np.ndarray:
        if self.face_embedder is None:
            raise PreconditionError("face enrolment is unavailable: the face identity model is not loaded")
        faces = [f for f in self.face_embedder(image) if f.embedding is not None]
        if not faces:
            raise InvalidRequestError("image: no face found")
        faces.sort(key=lambda f: area(f.box), reverse=True)
        # Several faces of similar size: we cannot know whose consent this is.
        if len(faces) > 1 and area(faces[1].box) > 0.5 * area(faces[0].box):
            raise InvalidRequestError(f"image: {len(faces)} faces of similar size; use an image of one person")
        embedding = np.asarray(faces[0].embedding, dtype=np.float32).reshape(-1)
        if embedding.shape != (EMBEDDING_DIM,) or not np.all(np.isfinite(embedding)):
            raise InvalidRequestError(f"image: face template has shape {embedding.shape}, expected (128,)")
        return embedding

    def _profile(self, profile_id: str) -> skills_pb2.Profile:
        row = self.ctx.db.connect().execute("SELECT * FROM greeter_profiles WHERE profile_id=?",
                                            (profile_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no profile {profile_id!r}")
        return _profile_message(row)

    def list_profiles(self) -> list[skills_pb2.Profile]:
        rows = self.ctx.db.connect().execute("SELECT * FROM greeter_profiles ORDER BY enrolled_time").fetchall()
        return [_profile_message(r) for r in rows]

    def delete_profile(self, profile_id: str) -> None:
        self._profile(profile_id)
        conn = self.ctx.db.connect()
        conn.execute("PRAGMA secure_delete=ON")   # overwrite freed pages: the template must not linger on disk
        with self.ctx.db.transaction() as tx:
            tx.execute("DELETE FROM greeter_profiles WHERE profile_id=?", (profile_id,))
            # Greetings name the person: they go too (the events table is shared; we delete only ours).
            tx.execute("DELETE FROM events WHERE skill='greeter' AND payload_json LIKE ?",
                       (f'%"profile_id": "{profile_id}"%',))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._templates = None
        self._last_greeted.pop(profile_id, None)
        log.info("greeter.profile_deleted", profile_id=profile_id)

    def _load_templates(self) -> dict[str, tuple[str, np.ndarray]]:
        if self._templates is None:
            rows = self.ctx.db.connect().execute(
                "SELECT profile_id, name, template FROM greeter_profiles WHERE template IS NOT NULL").fetchall()
            cipher = self.cipher
            self._templates = {} if cipher is None else {
                r["profile_id"]: (r["name"], cipher.open(r["profile_id"], r["template"])) for r in rows}
        return self._templates

    def match(self, embedding: np.ndarray) -> tuple[str, str, float] | None:
        """(profile_id, name, distance) of the nearest template under the threshold, else None."""
        best = None
        for profile_id, (name, template) in self._load_templates().items():
            distance = float(np.linalg.norm(template - np.asarray(embedding, dtype=np.float32)))
            if distance < self.config.match_threshold and (best is None or distance < best[2]):
                best = (profile_id, name, distance)
        return best

    # ------------------------------------------------------------------ approach
    async def on_frame(self, analysis: FrameAnalysis) -> None:
        if is_moving(self.vehicle):
            return
        faces = [f for f in analysis.faces if f.embedding is not None]
        if not faces:
            return
        now = self.now
        if now - self._window_start > self.config.attempt_window_seconds:
            self._window_start, self._attempts, self._gave_up = now, 0, False
        if self._gave_up:
            return
        with self.measure():
            found = [m for m in (self.match(f.embedding) for f in faces) if m is not None]
        if not found:
            self._attempts += 1
            if self._attempts >= self.config.max_attempts:
                self._gave_up = True
                self.emit("not_recognised", common_pb2.SEVERITY_INFO,
                          f"No enrolled face recognised after {self._attempts} attempts; key fob fallback remains",
                          {"attempts": self._attempts}, camera_id=analysis.camera_id)
            return
        profile_id, name, distance = min(found, key=lambda m: m[2])
        self._greet(profile_id, name, "face", analysis.camera_id, {"distance": round(distance, 4)})

    async def on_vehicle(self, previous, current) -> None:
        fob = current.key_fob_id
        if not fob or fob == previous.key_fob_id or is_moving(current):
            return
        row = self.ctx.db.connect().execute(
            "SELECT profile_id, name FROM greeter_profiles WHERE key_fob_id=? ORDER BY enrolled_time LIMIT 1",
            (fob,)).fetchone()
        if row is not None:
            self._greet(row["profile_id"], row["name"], "key_fob", "", {})

    def _greet(self, profile_id: str, name: str, method: str, camera_id: str, extra: dict) -> None:
        """Decide now (cool-down, attempts); word the greeting in the background."""
        now = self.now
        last = self._last_greeted.get(profile_id)
        if last is not None and now - last < self.config.greet_cooldown_seconds:
            return
        self._last_greeted[profile_id] = now
        self._attempts, self._gave_up = 0, False
        self.spawn(self._say_welcome(profile_id, name, method, camera_id, extra))

    async def _say_welcome(self, profile_id: str, name: str, method: str, camera_id: str, extra: dict) -> None:
        words = await narrate(self.ctx.narrator, task="You are the car, greeting its driver who walks up.",
                              draft=f"Welcome back, {name}!", priority=JobClass.INTERACTIVE, must_keep=(name,), max_tokens=32)
        self.emit("greeting", common_pb2.SEVERITY_INFO, words,
                  {"profile_id": profile_id, "method": method, **extra}, camera_id=camera_id)
        row = self.ctx.db.connect().execute("SELECT preferences_json FROM greeter_profiles WHERE profile_id=?",
                                            (profile_id,)).fetchone()
        preferences = json.loads(row["preferences_json"]) if row and row["preferences_json"] else {}
        self.emit("profile_apply", common_pb2.SEVERITY_INFO, f"Applying {name}'s presets",
                  {"profile_id": profile_id, "preferences": preferences, "method": method}, camera_id=camera_id)


def decode_image(image: common_pb2.Image, max_pixels: int) -> np.ndarray:
    """An uploaded `incar.v1.Image` as BGR (header-checked first); raises InvalidRequestError naming the field."""
    try:
        return decode_checked(image, max_pixels)
    except FrameError as exc:
        raise InvalidRequestError(str(exc)) from None


def _profile_message(row) -> skills_pb2.Profile:
    profile = skills_pb2.Profile(profile_id=row["profile_id"], name=row["name"], key_fob_id=row["key_fob_id"],
                                 preferences_json=row["preferences_json"])
    profile.enrolled_time.FromNanoseconds(int(row["enrolled_time"] * 1e9))
    return profile


__all__ = ["Greeter", "TemplateCipher", "decode_image"]
