"""The certificate trust list a catalog signs, as asn1crypto schemas (Microsoft's CTL, wincrypt.h / MS-CAT).

    CertificateTrustList ::= SEQUENCE {
        version            INTEGER DEFAULT v1,
        subjectUsage       SEQUENCE OF OBJECT IDENTIFIER,   -- catalogs: szOID_CATALOG_LIST 1.3.6.1.4.1.311.12.1.1
        listIdentifier     OCTET STRING OPTIONAL,
        sequenceNumber     INTEGER OPTIONAL,
        ctlThisUpdate      Time,
        ctlNextUpdate      Time OPTIONAL,
        subjectAlgorithm   AlgorithmIdentifier,             -- CATALOG_LIST_MEMBER (v1) or MEMBER2 (v2)
        trustedSubjects    SEQUENCE OF TrustedSubject OPTIONAL,
        ctlExtensions      [0] EXPLICIT Extensions OPTIONAL }
    TrustedSubject ::= SEQUENCE { subjectIdentifier OCTET STRING, subjectAttributes SET OF Attribute OPTIONAL }
    SpcIndirectDataContent ::= SEQUENCE { data SpcAttributeTypeAndOptionalValue, messageDigest DigestInfo }

The schemas only describe; asn1crypto does the decoding (vhdtool.cabinet.catalog uses them).
"""

from __future__ import annotations

from asn1crypto import algos, core, x509


class _AttributeValues(core.SetOf):
    _child_spec = core.Any


class CatalogAttribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AttributeValues)]


class CatalogAttributes(core.SetOf):
    _child_spec = CatalogAttribute


class TrustedSubject(core.Sequence):
    _fields = [("identifier", core.OctetString), ("attributes", CatalogAttributes, {"optional": True})]


class TrustedSubjects(core.SequenceOf):
    _child_spec = TrustedSubject


class SubjectUsage(core.SequenceOf):
    _child_spec = core.ObjectIdentifier


class CertificateTrustList(core.Sequence):
    _fields = [
        ("version", core.Integer, {"optional": True}),
        ("subject_usage", SubjectUsage),
        ("list_identifier", core.OctetString, {"optional": True}),
        ("sequence_number", core.Integer, {"optional": True}),
        ("this_update", x509.Time),
        ("next_update", x509.Time, {"optional": True}),
        ("subject_algorithm", algos.DigestAlgorithm),
        ("trusted_subjects", TrustedSubjects, {"optional": True}),
        ("extensions", x509.Extensions, {"explicit": 0, "optional": True}),
    ]


class SpcAttributeTypeAndOptionalValue(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("value", core.Any, {"optional": True})]


class SpcIndirectDataContent(core.Sequence):
    _fields = [("data", SpcAttributeTypeAndOptionalValue), ("message_digest", algos.DigestInfo)]
