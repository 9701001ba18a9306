"""CoCo sealed-secret test vectors (coco-interfaces.md §2), shared by the format tests."""

VECTOR_A = (
    "sealed.eyJiNjQiOnRydWUsImFsZyI6IkVTMjU2Iiwia2lkIjoia2JzOi8vL2RlZmF1bHQvc2lnbmluZy1rZXkvc2Vh"
    "bGVkLXNlY3JldCJ9.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2RlZmF1bH"
    "Qvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6e30sImFubm90YX"
    "Rpb25zIjp7fX0.ZI2fTv5ramHqHQa9DKBFD5hlJ_Mjf6cEIcpsNGshpyhEiKklML0abfH600TD7LAFHf53oDIJmEcVsDt"
    "J20UafQ"
)
VECTOR_B = (
    "sealed.eyJiNjQiOnRydWUsImFsZyI6IkVTMjU2Iiwia2lkIjoia2JzOi8vL2RlZmF1bHQvc2lnbmluZy1rZXkvc2Vh"
    "bGVkLXNlY3JldCJ9.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2RlZmF1bH"
    "QvbmdjLWFwaS1rZXkvaW5zdHJ1Y3QiLCJwcm92aWRlciI6ImticyIsInByb3ZpZGVyX3NldHRpbmdzIjp7fSwiYW5u"
    "b3RhdGlvbnMiOnt9fQ.wpqvVFUaQymqgf54h70shZWDpk2NLW305wALz09YF0GKFBKBQiQB2sRwvn9Jk_rSju3YGLYxPO"
    "2Ub8qUbiMCuA"
)
VECTOR_C = (
    "sealed.fakejwsheader.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2RlZm"
    "F1bHQvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6e30sImFubm"
    "90YXRpb25zIjp7fX0.fakesignature"
)
HEADER_AB = b'{"b64":true,"alg":"ES256","kid":"kbs:///default/signing-key/sealed-secret"}'
PAYLOAD_A = (
    b'{"version":"0.1.0","type":"vault","name":"kbs:///default/sealed-secret/test",'
    b'"provider":"kbs","provider_settings":{},"annotations":{}}'
)
PAYLOAD_B = (
    b'{"version":"0.1.0","type":"vault","name":"kbs:///default/ngc-api-key/instruct",'
    b'"provider":"kbs","provider_settings":{},"annotations":{}}'
)
SIGNING_KID = "kbs:///default/signing-key/sealed-secret"
PUBLIC_JWK = (
    b'{"alg":"ES256","crv":"P-256","kid":"sealed-secret-test-key","kty":"EC","use":"sig",'
    b'"x":"4jH376AuwTUCIx65AJ_56D7SZzWf7sGcEA7_Csq21UM",'
    b'"y":"rjdceysnSa5ZfzWOPGCURMUuHndxBAGUu4ISTIVN0yA"}'
)
ENVELOPE_1 = b"""{
  "version": "0.1.0",
  "type": "envelope",
  "key_id": "xxx",
  "encrypted_key": "yyy",
  "encrypted_data": "zzz",
  "wrap_type": "A256GCM",
  "iv": "www",
  "provider": "aliyun",
  "provider_settings": {},
  "annotations": {}
}
"""
VAULT_2 = (
    b'{"version":"0.1.0","type":"vault","name":"kbs:///one/2/trois","provider":"kbs",'
    b'"provider_settings":{},"annotations":{}}'
)
TEST_KEY = {
    "kty": "EC",
    "crv": "P-256",
    "kid": "test-key",
    "d": "7baJLiTk68NcLgYPv05jJvElqoAhbzi1ZWx4OyILUtA",
    "x": "QT3_slJmispaOwnAo6hxebXGLRuiveFuRCLpS4j4S4k",
    "y": "jcDn4N4nRBQ-a7_D3qjqtb6hwOAXh_ve1wvibPSi1G0",
}
