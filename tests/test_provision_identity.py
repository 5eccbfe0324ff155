"""provisioning.identity and provisioning.broker_files without a broker: the CA and certificates, file modes,
identity names, and the password hash checked against mosquitto's own `mosquitto_passwd` in both directions."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning import ProvisionError
from provisioning.broker_files import TopicLayout, acl_file, mosquitto_hash, mosquitto_verify, password_file
from provisioning.identity import IdentityStore, check_id, crl_pem, fingerprint


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def mosquitto_passwd() -> str:
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(exe).exists():
        pytest.fail("mosquitto_passwd is not installed: run scripts/test.sh (apt-get install mosquitto)")
    return exe


def test_ca_and_client_certificate(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path / "site")
    ca = store.create_ca("xishan")
    creds = store.ensure(ca, "slope-07")

    cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    cert.verify_directly_issued_by(ca.cert)  # raises if not signed by the site CA
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "slope-07"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(creds.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key()
    assert fingerprint(cert) == "sha256:" + cert.fingerprint(hashes.SHA256()).hex()

    for secret in (store.ca_key_path, creds.key_path, creds.secrets_path):
        assert mode(secret) == 0o600, secret
    assert mode(store.root) == 0o700 and mode(creds.key_path.parent) == 0o700
    assert not list(store.root.rglob(".*.tmp")), "a temporary file was left behind"
    assert creds.password not in repr(creds) and "PRIVATE" not in repr(ca)


def test_existing_ca_and_identity_are_kept(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ca = store.create_ca("xishan")
    first = store.ensure(ca, "slope-07")
    assert fingerprint(store.create_ca("xishan").cert) == fingerprint(ca.cert)
    again = store.ensure(store.load_ca(), "slope-07")
    assert (again.password, fingerprint(again.cert)) == (first.password, fingerprint(first.cert))


def test_interrupted_rekey_gets_a_certificate_for_the_key_on_disk(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ca = store.create_ca("xishan")
    first = store.ensure(ca, "slope-07")
    first.key_path.unlink()  # as if a run died after deleting the old key and before writing the new certificate
    again = store.ensure(ca, "slope-07")
    key = serialization.load_pem_private_key(again.key_path.read_bytes(), password=None)
    assert again.cert.public_key() == key.public_key() != first.cert.public_key()


def test_rekey_changes_key_certificate_and_password(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ca = store.create_ca("xishan")
    old = store.ensure(ca, "slope-07")
    new = store.rekey(ca, "slope-07")
    assert new.password != old.password
    assert new.cert.serial_number != old.cert.serial_number
    assert new.cert.public_key() != old.cert.public_key()


@pytest.mark.parametrize("bad", ["", "a/b", "node+", "node#", "a:b", ".hidden", "x" * 65, "节点", "a b"])
def test_identity_names_that_would_widen_an_acl_are_refused(bad: str) -> None:
    with pytest.raises(ProvisionError, match="letters, digits"):
        check_id(bad)


def test_missing_ca_says_to_run_init_site(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="init-site"):
        IdentityStore(tmp_path).load_ca()


def test_crl_lists_revoked_serials(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ca = store.create_ca("xishan")
    gone = store.ensure(ca, "slope-07")
    crl = x509.load_pem_x509_crl(crl_pem(ca, [gone.cert.serial_number]))
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(gone.cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(gone.cert.serial_number + 1) is None


def test_our_hash_matches_mosquitto_passwd_format(tmp_path: Path) -> None:
    """mosquitto_passwd writes a line; our verifier must accept its hash for the right password only, and our
    own line must have exactly its shape (same type, iteration count, salt and hash lengths)."""
    pwfile = tmp_path / "pw"
    subprocess.run([mosquitto_passwd(), "-c", "-b", str(pwfile), "alice", "correct horse"], check=True,
                   capture_output=True)
    user, theirs = pwfile.read_text().strip().split(":", 1)
    assert user == "alice"
    assert mosquitto_verify("correct horse", theirs)
    assert not mosquitto_verify("correct hors", theirs)

    ours = mosquitto_hash("correct horse")
    assert mosquitto_verify("correct horse", ours) and not mosquitto_verify("wrong", ours)
    shape = [len(p) for p in theirs.split("$")]
    assert [len(p) for p in ours.split("$")] == shape, (ours, theirs)
    assert ours.split("$")[:3] == theirs.split("$")[:3]  # "", "7", iterations


def test_mosquitto_passwd_keeps_our_lines(tmp_path: Path) -> None:
    """mosquitto_passwd parses the file we write when it adds a user: a malformed line of ours would make
    it fail or drop the line."""
    pwfile = tmp_path / "pw"
    pwfile.write_text(password_file([("slope-07", "pw-a"), ("platform", "pw-b")]))
    subprocess.run([mosquitto_passwd(), "-b", str(pwfile), "bob", "x"], check=True, capture_output=True)
    lines = dict(line.split(":", 1) for line in pwfile.read_text().splitlines())
    assert set(lines) == {"slope-07", "platform", "bob"}
    assert mosquitto_verify("pw-a", lines["slope-07"]) and mosquitto_verify("pw-b", lines["platform"])


def test_acl_names_only_own_topics() -> None:
    text = acl_file(TopicLayout("yujing/v1", "xishan"), ["slope-07", "slope-08"], "platform")
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n") if b.startswith("user ")}
    assert blocks["user slope-07"] == [
        "topic write yujing/v1/xishan/slope-07/birth", "topic write yujing/v1/xishan/slope-07/data",
        "topic write yujing/v1/xishan/slope-07/death", "topic write yujing/v1/xishan/slope-07/alarm",
        "topic write yujing/v1/xishan/slope-07/alarms", "topic write yujing/v1/xishan/slope-07/reply",
        "topic read yujing/v1/xishan/slope-07/cmd"]
    assert not any("slope-08" in line for line in blocks["user slope-07"])
    assert "pattern" not in text and "#" not in "".join(blocks["user slope-07"])
