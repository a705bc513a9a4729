"""Tests of the SCRAM-SHA-256 primitives and state machines (no sockets).

Real-world vectors:

* RFC 7677 section 3 (user "user", password "pencil");
* an exchange recorded between libpq (psycopg2) and PostgreSQL 15.18 for the dev login
  ``teller_sz01`` (password ``pw_teller_sz01``), with the verifier PostgreSQL stored for it in
  ``pg_authid`` -- ScramServer must answer libpq's messages with PostgreSQL's exact bytes, and
  ScramClient must produce libpq's exact client-final;
* verifiers computed by libpq's ``PQencryptPasswordConn`` for non-ASCII passwords, which pin
  our SASLprep to PostgreSQL's.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from proxy.scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramClient,
    ScramError,
    ScramServer,
    ScramVerifier,
    client_key_from_salted,
    make_verifier,
    mock_verifier,
    parse_verifier,
    salted_password,
    saslprep,
    stored_key_from_client_key,
    tls_server_end_point,
)

# RFC 7677, section 3.
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Recorded libpq <-> PostgreSQL 15.18 exchange for teller_sz01.
PG_VERIFIER = (
    "SCRAM-SHA-256$4096:EIJMYKLeuTZ8sJbv37+Sng==$ztbaq4LFYpcGkB0aREKz1q0LGV1EizQPjUnQEegzipc="
    ":W6sCZN71ct067DFyjvFmVIdh992wswzaVHIKbvUfmnc="
)
PG_CLIENT_FIRST = b"n,,n=,r=o+U0RKcLnSgK/6PYMVyZAsZu"
PG_SERVER_NONCE = "U6If3vLb589npjl3AdS2L/n0"
PG_SERVER_FIRST = (
    b"r=o+U0RKcLnSgK/6PYMVyZAsZuU6If3vLb589npjl3AdS2L/n0,s=EIJMYKLeuTZ8sJbv37+Sng==,i=4096"
)
PG_CLIENT_FINAL = (
    b"c=biws,r=o+U0RKcLnSgK/6PYMVyZAsZuU6If3vLb589npjl3AdS2L/n0,"
    b"p=W1peOB3y3gzj7GrlrPWJkWmHffmX8WLwM9Ew4ehuGX8="
)
PG_SERVER_FINAL = b"v=v3whfDpuP7CtLbWGZNyHiut73ey0SAMhtoCeCK4+QJ4="

# Verifiers made by libpq's PQencryptPasswordConn (random salts, so compare with that salt).
LIBPQ_VERIFIERS = {
    "pw_teller_sz01": "SCRAM-SHA-256$4096:6LjZrGEJIFnESktUb+1kDQ==$v4S61Gnq1/SdbPV+ggDkbPPwAO+3Ss"
    "UYjpjt9c0G/jo=:2OTCYr/hwJYyVvPILrHEo+NoER5T7PkzT8v0WYHodSE=",
    # CJK + Roman numeral nine (NFKC -> "IX") + soft hyphen (mapped to nothing)
    "密码Ⅸ\u00ad": "SCRAM-SHA-256$4096:8J+cBR8AVR4gaTW1RJnxgQ==$uUsHbYpj+6Qvd1tRDwCa2DsM4VBZzhBF"
    "iQ525rHEPtE=:bhujD2D0V2kG+gdpYqzYkB4Ww0+26zuEfca58+nVKK0=",
    # full-width letters (NFKC -> "pass")
    "ｐａｓｓ": "SCRAM-SHA-256$4096:dhA2YyKuZN1TLaF5Uf5HVQ==$TdTlWGqF+QfyO3tu4tSDFfU7LhIzXcta9wipF"
    "Suto/Q=:8AyPaono000tL1Ykd7aSrnuChbS3DtKTe8lWwhSb0go=",
    # RandALCat followed by a digit: fails the bidi rule, so the raw bytes are used
    "\u0627\u0031": "SCRAM-SHA-256$4096:IViCQzGRlWXSLb4UF/f4LQ==$k27Y0+WC8Xr2th1rCjY68ZxwDXEo2eVm4a6"
    "Zo1Is38g=:D1Y2XG01AH8dW0uXHHUlPbtjkvjQRhVNvmWV4wMKtGo=",
}


def _exchange(client: ScramClient, server: ScramServer, mechanism: str | None = None) -> None:
    server_first = server.handle_client_first(client.client_first(), mechanism)
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.handle_server_final(server_final)


@pytest.fixture(scope="module")
def verifier() -> ScramVerifier:
    return parse_verifier(make_verifier("correct horse", b"0123456789abcdef", 4096))


# ---------------------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------------------


def test_rfc7677_vector_client_side() -> None:
    client = ScramClient("user", "pencil", nonce=RFC_CLIENT_NONCE)
    assert client.mechanism == SCRAM_SHA_256
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL)
    assert client.server_verified


def test_rfc7677_vector_server_side() -> None:
    verifier = parse_verifier(make_verifier("pencil", RFC_SALT, 4096))
    server = ScramServer(verifier, None, server_nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(RFC_CLIENT_FIRST, SCRAM_SHA_256) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    salted = salted_password("pencil", RFC_SALT, 4096)
    assert server.client_key == client_key_from_salted(salted)


def test_postgres_recorded_exchange_server_side() -> None:
    server = ScramServer(parse_verifier(PG_VERIFIER), None, server_nonce=PG_SERVER_NONCE)
    assert server.handle_client_first(PG_CLIENT_FIRST, SCRAM_SHA_256) == PG_SERVER_FIRST
    assert server.handle_client_final(PG_CLIENT_FINAL) == PG_SERVER_FINAL
    expected = client_key_from_salted(
        salted_password("pw_teller_sz01", parse_verifier(PG_VERIFIER).salt, 4096)
    )
    assert server.client_key == expected


def test_postgres_recorded_exchange_client_side() -> None:
    """With libpq's nonce our client-final is byte-identical to libpq's, by password and by
    the ClientKey recovered from the proof."""
    client = ScramClient("", "pw_teller_sz01", nonce="o+U0RKcLnSgK/6PYMVyZAsZu")
    assert client.client_first() == PG_CLIENT_FIRST
    assert client.handle_server_first(PG_SERVER_FIRST) == PG_CLIENT_FINAL
    client.handle_server_final(PG_SERVER_FINAL)
    assert client.server_verified

    server = ScramServer(parse_verifier(PG_VERIFIER), None, server_nonce=PG_SERVER_NONCE)
    server.handle_client_first(PG_CLIENT_FIRST)
    server.handle_client_final(PG_CLIENT_FINAL)
    assert server.client_key is not None
    by_key = ScramClient(
        "",
        client_key=server.client_key,
        verifier=parse_verifier(PG_VERIFIER),
        nonce="o+U0RKcLnSgK/6PYMVyZAsZu",
    )
    by_key.client_first()
    assert by_key.handle_server_first(PG_SERVER_FIRST) == PG_CLIENT_FINAL
    by_key.handle_server_final(PG_SERVER_FINAL)
    assert by_key.server_verified


@pytest.mark.parametrize("password", list(LIBPQ_VERIFIERS))
def test_make_verifier_matches_libpq(password: str) -> None:
    stored = LIBPQ_VERIFIERS[password]
    parsed = parse_verifier(stored)
    assert make_verifier(password, parsed.salt, parsed.iterations) == stored


def test_postgres_stored_verifier_matches_password() -> None:
    parsed = parse_verifier(PG_VERIFIER)
    assert parsed.encode() == PG_VERIFIER
    assert make_verifier("pw_teller_sz01", parsed.salt, parsed.iterations) == PG_VERIFIER


def test_saslprep() -> None:
    assert saslprep("pencil") == b"pencil"
    assert saslprep("I\u00adX") == b"IX"  # soft hyphen mapped to nothing
    assert saslprep("\u2168") == b"IX"  # NFKC
    assert saslprep("a\u00a0b") == b"a b"  # non-ASCII space -> space
    assert saslprep("a\u0007b") == b"a\x07b"  # ASCII is never touched (as PostgreSQL)
    assert saslprep("caf\u00e9\u0007") == "caf\u00e9\u0007".encode()  # prohibited: raw bytes
    assert saslprep(b"\xff\xfe") == b"\xff\xfe"  # not UTF-8: raw bytes


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_round_trip_success_and_client_key(verifier: ScramVerifier) -> None:
    client = ScramClient("alice", "correct horse")
    server = ScramServer(verifier)
    _exchange(client, server, SCRAM_SHA_256)
    assert client.server_verified
    salted = salted_password("correct horse", verifier.salt, verifier.iterations)
    assert server.client_key == client_key_from_salted(salted)
    assert stored_key_from_client_key(server.client_key) == verifier.stored_key


def test_wrong_password_rejected(verifier: ScramVerifier) -> None:
    client = ScramClient("alice", "wrong horse")
    server = ScramServer(verifier)
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(ScramError) as info:
        server.handle_client_final(final)
    assert info.value.sqlstate == "28P01"
    assert server.client_key is None
    with pytest.raises(ScramError):  # a failed exchange cannot be continued
        server.handle_client_final(final)


def test_client_key_login_accepted(verifier: ScramVerifier) -> None:
    """The proxy's upstream login: a ClientKey recovered from one exchange authenticates a
    fresh exchange (new nonces) against the same verifier."""
    first = ScramServer(verifier)
    _exchange(ScramClient("alice", "correct horse"), first)
    assert first.client_key is not None

    with_verifier = ScramClient("alice", client_key=first.client_key, verifier=verifier)
    upstream = ScramServer(verifier)
    _exchange(with_verifier, upstream)
    assert with_verifier.server_verified
    assert upstream.client_key == first.client_key

    key_only = ScramClient("alice", client_key=first.client_key)
    _exchange(key_only, ScramServer(verifier))
    assert not key_only.server_verified  # ServerKey unknown: documented, cannot be checked


def test_client_key_login_against_other_salt_refused(verifier: ScramVerifier) -> None:
    first = ScramServer(verifier)
    _exchange(ScramClient("alice", "correct horse"), first)
    assert first.client_key is not None
    changed = parse_verifier(make_verifier("correct horse", b"another salt 123"))
    client = ScramClient("alice", client_key=first.client_key, verifier=verifier)
    server = ScramServer(changed)
    with pytest.raises(ScramError) as info:
        client.handle_server_first(server.handle_client_first(client.client_first()))
    assert info.value.sqlstate == "28P01"
    with pytest.raises(ValueError):
        ScramClient("alice", client_key=first.client_key, verifier=changed)


def test_forged_server_signature_detected(verifier: ScramVerifier) -> None:
    client = ScramClient("alice", "correct horse")
    server = ScramServer(verifier)
    server.handle_client_final(
        client.handle_server_first(server.handle_client_first(client.client_first()))
    )
    with pytest.raises(ScramError):
        client.handle_server_final(b"v=" + base64.b64encode(b"\0" * 32))


def test_server_error_attribute() -> None:
    client = ScramClient("alice", "pw", nonce="abc")
    client.client_first()
    client.handle_server_first(b"r=abcdef,s=c2FsdA==,i=4096")
    with pytest.raises(ScramError) as info:
        client.handle_server_final(b"e=invalid-proof")
    assert "invalid-proof" in info.value.message


def test_replayed_final_fails_on_new_nonce(verifier: ScramVerifier) -> None:
    client = ScramClient("alice", "correct horse")
    server = ScramServer(verifier)
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    server.handle_client_final(final)
    replay = ScramServer(verifier)  # new random server nonce
    replay.handle_client_first(b"n,,n=," + client._client_first_bare.split(b",")[1])
    with pytest.raises(ScramError):
        replay.handle_client_final(final)


def test_mock_verifier_never_authenticates() -> None:
    secret = b"per-process secret"
    mock = mock_verifier("nobody", secret)
    assert mock.salt == mock_verifier("nobody", secret).salt  # stable across attempts
    assert mock.salt != mock_verifier("somebody", secret).salt
    client = ScramClient("nobody", "any password")
    server = ScramServer(mock)
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(ScramError) as info:
        server.handle_client_final(final)
    assert info.value.sqlstate == "28P01"


# ---------------------------------------------------------------------------------------------
# Channel binding
# ---------------------------------------------------------------------------------------------


def _cert(key: object, algorithm: hashes.HashAlgorithm | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgveil-test")])
    start = datetime.datetime(2024, 1, 1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize("name", ["sha256", "sha384", "sha512"])
def test_tls_server_end_point_uses_signature_hash(
    ec_key: ec.EllipticCurvePrivateKey, name: str
) -> None:
    der = _cert(ec_key, {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
                         "sha512": hashes.SHA512()}[name])  # fmt: skip
    assert tls_server_end_point(der) == hashlib.new(name, der).digest()


@pytest.mark.parametrize("weak_oid", [bytes.fromhex("2a864886f70d010105"),  # sha1WithRSA
                                      bytes.fromhex("2a864886f70d010104")])  # md5WithRSA  # fmt: skip
def test_tls_server_end_point_upgrades_md5_and_sha1_to_sha256(weak_oid: bytes) -> None:
    # Nothing signs with MD5/SHA-1 any more, so relabel a sha256WithRSA certificate (same OID
    # length); only the algorithm identifier matters for channel binding.
    der = _cert(rsa.generate_private_key(65537, 1024), hashes.SHA256())
    sha256_oid = bytes.fromhex("2a864886f70d01010b")
    assert der.count(sha256_oid) == 2
    relabelled = der.replace(sha256_oid, weak_oid)
    assert tls_server_end_point(relabelled) == hashlib.sha256(relabelled).digest()


def test_tls_server_end_point_refuses_ed25519() -> None:
    with pytest.raises(ScramError):
        tls_server_end_point(_cert(ed25519.Ed25519PrivateKey.generate(), None))


def test_channel_binding_round_trip(verifier: ScramVerifier) -> None:
    cb = hashlib.sha256(b"our certificate").digest()
    client = ScramClient("alice", "correct horse", channel_binding=cb)
    server = ScramServer(verifier, cb)
    assert client.mechanism == SCRAM_SHA_256_PLUS
    assert server.mechanisms == (SCRAM_SHA_256_PLUS, SCRAM_SHA_256)
    first = client.client_first()
    assert first.startswith(b"p=tls-server-end-point,,")
    _exchange_from(first, client, server, SCRAM_SHA_256_PLUS)
    assert client.server_verified and server.client_key is not None


def _exchange_from(first: bytes, client: ScramClient, server: ScramServer, mech: str) -> None:
    final = client.handle_server_first(server.handle_client_first(first, mech))
    client.handle_server_final(server.handle_client_final(final))


def test_channel_binding_mismatch_rejected(verifier: ScramVerifier) -> None:
    """A man in the middle terminating TLS has a different certificate."""
    client = ScramClient("alice", "correct horse", channel_binding=b"\x01" * 32)
    server = ScramServer(verifier, b"\x02" * 32)
    final = client.handle_server_first(
        server.handle_client_first(client.client_first(), SCRAM_SHA_256_PLUS)
    )
    with pytest.raises(ScramError) as info:
        server.handle_client_final(final)
    assert info.value.sqlstate == "28000"


def test_downgrade_y_flag_rejected_when_plus_offered(verifier: ScramVerifier) -> None:
    client = ScramClient("alice", "correct horse", client_supports_binding=True)
    first = client.client_first()
    assert first.startswith(b"y,,")
    with pytest.raises(ScramError):
        ScramServer(verifier, b"\x01" * 32).handle_client_first(first, SCRAM_SHA_256)
    # Without TLS on our side 'y' is fine: the client is right that we cannot bind.
    _exchange_from(first, client, ScramServer(verifier), SCRAM_SHA_256)
    assert client.server_verified


@pytest.mark.parametrize(
    ("first", "cb", "mechanism"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", None, None),  # binding asked, none possible
        (b"p=tls-unique,,n=,r=abc", b"\x01" * 32, None),  # unsupported binding type
        (b"n,,n=,r=abc", b"\x01" * 32, SCRAM_SHA_256_PLUS),  # -PLUS without binding
        (b"p=tls-server-end-point,,n=,r=abc", b"\x01" * 32, SCRAM_SHA_256),  # binding w/o -PLUS
        (b"n,,n=,r=abc", None, SCRAM_SHA_256_PLUS),  # -PLUS not offered
        (b"n,a=admin,n=,r=abc", None, None),  # authzid
        (b"n,,n=,r=abc,m=ext", None, None),  # mandatory extension
        (b"x,,n=,r=abc", None, None),
        (b"n,,n=,r=", None, None),  # empty nonce
        (b"n,,r=abc", None, None),
        (b"n,,", None, None),
        (b"\xff\xfe", None, None),
    ],
)
def test_bad_client_first_rejected(
    verifier: ScramVerifier, first: bytes, cb: bytes | None, mechanism: str | None
) -> None:
    with pytest.raises(ScramError):
        ScramServer(verifier, cb).handle_client_first(first, mechanism)


def test_optional_extension_ignored(verifier: ScramVerifier) -> None:
    # RFC 5802 lets a client add optional attributes after the nonce; only m= is mandatory.
    server = ScramServer(verifier, server_nonce="SRV")
    assert server.handle_client_first(b"n,,n=,r=abc,x=1").startswith(b"r=abcSRV,")


@pytest.mark.parametrize(
    "final",
    [
        b"c=biws,r=WRONG,p=" + base64.b64encode(b"\0" * 32),
        b"c=eSws,r=NONCE,p=" + base64.b64encode(b"\0" * 32),  # 'y,,' binding data
        b"c=biws,r=NONCE,p=" + base64.b64encode(b"\0" * 31),
        b"c=biws,r=NONCE,p=!!!",
        b"c=biws,r=NONCE",
        b"r=NONCE,c=biws,p=" + base64.b64encode(b"\0" * 32),
        b"c=biws,r=NONCE,p=\xff",
    ],
)
def test_bad_client_final_rejected(verifier: ScramVerifier, final: bytes) -> None:
    server = ScramServer(verifier, server_nonce="SRV")
    server.handle_client_first(b"n,,n=,r=cli")
    with pytest.raises(ScramError):
        server.handle_client_final(final.replace(b"NONCE", b"cliSRV"))


def test_out_of_order_calls_rejected(verifier: ScramVerifier) -> None:
    with pytest.raises(ScramError):
        ScramServer(verifier).handle_client_final(b"c=biws,r=x,p=eA==")
    client = ScramClient("alice", "pw")
    with pytest.raises(ScramError):
        client.handle_server_first(b"r=x,s=c2FsdA==,i=1")
    with pytest.raises(ValueError):
        ScramClient("alice")  # neither password nor key
    with pytest.raises(ValueError):
        ScramClient("alice", "pw", client_key=b"\0" * 32)  # both


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=abc,s=c2FsdA==,i=4096",  # nonce not extended
        b"r=xyzdef,s=c2FsdA==,i=4096",  # nonce not ours
        b"r=abcdef,s=!!,i=4096",
        b"r=abcdef,s=c2FsdA==,i=0",
        b"r=abcdef,s=c2FsdA==,i=-1",
        b"r=abcdef,s=c2FsdA==",
        b"m=ext,r=abcdef,s=c2FsdA==,i=4096",
        b"r=abcdef,s=,i=4096",
    ],
)
def test_bad_server_first_rejected(server_first: bytes) -> None:
    client = ScramClient("alice", "pw", nonce="abc")
    client.client_first()
    with pytest.raises(ScramError):
        client.handle_server_first(server_first)


def test_mutated_messages_only_raise_scram_error(verifier: ScramVerifier) -> None:
    rng = random.Random(7677)
    for _ in range(300):
        client = ScramClient("alice", "correct horse")
        server = ScramServer(verifier)
        first = bytearray(client.client_first())
        final_mutation = rng.random() < 0.5
        if not final_mutation:
            first[rng.randrange(len(first))] = rng.randrange(256)
        try:
            server_first = server.handle_client_first(bytes(first))
            final = bytearray(client.handle_server_first(server_first))
            if final_mutation:
                final[rng.randrange(len(final))] = rng.randrange(256)
            server.handle_client_final(bytes(final))
        except ScramError:
            continue


# ---------------------------------------------------------------------------------------------
# Verifier strings
# ---------------------------------------------------------------------------------------------


def test_make_verifier_shape() -> None:
    text = make_verifier("pw")
    parsed = parse_verifier(text)
    assert parsed.iterations == 4096 and len(parsed.salt) == 16
    assert parsed.encode() == text
    assert make_verifier("pw") != text  # random salt
    assert "stored" not in repr(parsed) and base64.b64encode(parsed.stored_key).decode() not in (
        repr(parsed)
    )


@pytest.mark.parametrize(
    "text",
    [
        "md5" + "0" * 32,
        "plain password",
        "SCRAM-SHA-256$4096:c2FsdA==$abc",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:!!$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 40 + ":" + "A" * 44,
    ],
)
def test_parse_verifier_rejects(text: str) -> None:
    with pytest.raises(ScramError) as info:
        parse_verifier(text)
    assert info.value.sqlstate == "28P01"
