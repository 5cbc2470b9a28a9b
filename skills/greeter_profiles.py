"""Greeter's driver profiles: enrolment with its quality check, encrypted face templates, matching, deletion.

Privacy: enrolment needs explicit consent; only the face template (a 128-d embedding) is stored, encrypted with
AES-256-GCM (key from config or INCAR_PROFILE_KEY, never stored with the data), with the profile id as associated
data so a template cannot be moved to another profile. The image is never stored. Deleting a profile removes
its row, its greeting events, and (secure_delete) the freed database pages.

Quality: a template is only as good as its photo. Enrolment takes one face, big enough (`min_enrol_face_px`) and
roughly frontal (BlazeFace landmarks: nose near the eye midline, `service.perception.identity.check_enrollable`);
a near-profile face embeds unreliably and would later fail to match, or match the wrong person.
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from incar.v1 import skills_pb2
from service.perception.identity import check_enrollable, yaw_proxy
from skills.base import FaceEmbedder, InvalidRequestError, NotFoundError, PreconditionError, area
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
    """
    ALTER TABLE greeter_profiles ADD COLUMN enrol_yaw REAL NOT NULL DEFAULT 0;
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


class ProfileStore:
    def __init__(self, db, config: GreeterConfig, clock, face_embedder: FaceEmbedder | None = None):
        self.db, self.config, self.clock = db, config, clock
        self.face_embedder = face_embedder
        key = config.resolved_key()
        self.cipher = TemplateCipher(key) if key else None
        db.register_migrations("greeter", MIGRATIONS)
        self._templates: dict[str, tuple[str, np.ndarray]] | None = None   # profile_id -> (name, embedding)

    def _require_cipher(self) -> TemplateCipher:
        if self.cipher is None:
            raise PreconditionError("no profile key: set skills.greeter.profile_key or INCAR_PROFILE_KEY")
        return self.cipher

    def enroll(self, name: str, consent: bool, *, image: np.ndarray | None = None, key_fob_id: str = "",
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
        embedding, yaw = None, 0.0
        if image is not None:
            cipher = self._require_cipher()
            embedding, yaw = self._embed_one(image)
        profile_id = f"prof-{uuid.uuid4().hex[:16]}"
        template = cipher.seal(profile_id, embedding) if embedding is not None else None
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO greeter_profiles(profile_id, name, enrolled_time, key_fob_id, preferences_json,"
                       " template, enrol_yaw) VALUES(?,?,?,?,?,?,?)",
                       (profile_id, name, self.clock(), key_fob_id, preferences_json, template, yaw))
        self._templates = None
        return self.profile(profile_id)

    def _embed_one(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        if self.face_embedder is None:
            raise PreconditionError("face enrolment is unavailable: the face identity model is not loaded")
        faces = [f for f in self.face_embedder(image) if f.embedding is not None]
        if not faces:
            raise InvalidRequestError("image: no face found")
        faces.sort(key=lambda f: area(f.box), reverse=True)
        # Several faces of similar size: we cannot know whose consent this is.
        if len(faces) > 1 and area(faces[1].box) > 0.5 * area(faces[0].box):
            raise InvalidRequestError(f"image: {len(faces)} faces of similar size; use an image of one person")
        face = faces[0]
        side = min(face.box[2] - face.box[0], face.box[3] - face.box[1])
        if side < self.config.min_enrol_face_px:
            raise InvalidRequestError(f"image: the face is {side:.0f} px, enrolment needs at least "
                                      f"{self.config.min_enrol_face_px} px; come closer to the camera")
        if not face.landmarks:
            raise PreconditionError("image: the face detector gave no landmarks, so face quality cannot be checked")
        try:
            check_enrollable(face, self.config.max_enrol_yaw)
        except ValueError as exc:
            raise InvalidRequestError(f"image: {str(exc).removeprefix('identity: ')}") from None
        embedding = np.asarray(face.embedding, dtype=np.float32).reshape(-1)
        if embedding.shape != (EMBEDDING_DIM,) or not np.all(np.isfinite(embedding)):
            raise InvalidRequestError(f"image: face template has shape {embedding.shape}, expected (128,)")
        return embedding, yaw_proxy(face)

    def profile(self, profile_id: str) -> skills_pb2.Profile:
        row = self.db.connect().execute("SELECT * FROM greeter_profiles WHERE profile_id=?",
                                        (profile_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no profile {profile_id!r}")
        return profile_message(row)

    def list(self) -> list[skills_pb2.Profile]:
        rows = self.db.connect().execute("SELECT * FROM greeter_profiles ORDER BY enrolled_time").fetchall()
        return [profile_message(r) for r in rows]

    def by_fob(self, fob: str):
        return self.db.connect().execute("SELECT profile_id, name FROM greeter_profiles WHERE key_fob_id=? "
                                         "ORDER BY enrolled_time LIMIT 1", (fob,)).fetchone() if fob else None

    def preferences(self, profile_id: str) -> dict:
        row = self.db.connect().execute("SELECT preferences_json FROM greeter_profiles WHERE profile_id=?",
                                        (profile_id,)).fetchone()
        return json.loads(row["preferences_json"]) if row and row["preferences_json"] else {}

    def delete(self, profile_id: str) -> None:
        self.profile(profile_id)
        conn = self.db.connect()
        conn.execute("PRAGMA secure_delete=ON")   # overwrite freed pages: the template must not linger on disk
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM greeter_profiles WHERE profile_id=?", (profile_id,))
            # Greetings name the person: they go too (the events table is shared; we delete only ours).
            tx.execute("DELETE FROM events WHERE skill='greeter' AND payload_json LIKE ?",
                       (f'%"profile_id": "{profile_id}"%',))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._templates = None
        log.info("greeter.profile_deleted", profile_id=profile_id)

    def templates(self) -> dict[str, tuple[str, np.ndarray]]:
        if self._templates is None:
            rows = self.db.connect().execute(
                "SELECT profile_id, name, template FROM greeter_profiles WHERE template IS NOT NULL").fetchall()
            cipher = self.cipher
            self._templates = {} if cipher is None else {
                r["profile_id"]: (r["name"], cipher.open(r["profile_id"], r["template"])) for r in rows}
        return self._templates

    def match(self, embedding: np.ndarray) -> tuple[str, str, float] | None:
        """(profile_id, name, distance) of the nearest template under the threshold, else None."""
        best = None
        for profile_id, (name, template) in self.templates().items():
            distance = float(np.linalg.norm(template - np.asarray(embedding, dtype=np.float32)))
            if distance < self.config.match_threshold and (best is None or distance < best[2]):
                best = (profile_id, name, distance)
        return best


def profile_message(row) -> skills_pb2.Profile:
    profile = skills_pb2.Profile(profile_id=row["profile_id"], name=row["name"], key_fob_id=row["key_fob_id"],
                                 preferences_json=row["preferences_json"], face=row["template"] is not None,
                                 enrol_yaw=row["enrol_yaw"])
    profile.enrolled_time.FromNanoseconds(int(row["enrolled_time"] * 1e9))
    return profile
