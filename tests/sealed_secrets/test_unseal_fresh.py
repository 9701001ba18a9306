"""``unseal_fresh``: a vault sealed secret unsealed past the resource cache, so expiring
credentials refreshed on a republish are the tenant's newest value (issue 10)."""

from __future__ import annotations

from pathlib import Path

from jwcrypto import jwk

from sealed_secrets import seal
from sealed_secrets.resolver import CachingResolver
from tests.sealed_secrets.test_resolver import CountingSource, FakeClock
from tests.sealed_secrets.vectors_coco import TEST_KEY

SIGNING = jwk.JWK(**TEST_KEY)


def test_unseal_fresh_fetches_the_vault_resource_again(tmp_path: Path) -> None:
    (tmp_path / "tenant-a").write_text(SIGNING.export_public())
    sealed = seal.seal_vault(
        "kbs:///default/objcreds/sts-token", "kbs", signing_key=SIGNING, signing_kid="tenant-a"
    )
    src = CountingSource({"default/objcreds/sts-token": b"token-one"})
    r = CachingResolver(src, cache_ttl=60, clock=FakeClock(), key_dir=str(tmp_path))
    assert r.unseal(sealed) == b"token-one"
    src.resources["default/objcreds/sts-token"] = b"token-two"  # the tenant rotates it
    assert r.unseal(sealed) == b"token-one"  # the cache answers within its TTL
    fetches = len(src.calls)
    assert r.unseal_fresh(sealed) == b"token-two"
    assert len(src.calls) == fetches + 1
    assert r.unseal(sealed) == b"token-two"  # and the cache now holds the newest value
