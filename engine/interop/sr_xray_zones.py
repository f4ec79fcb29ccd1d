"""TID 1501 measurement groups for the radiograph Brixia zone scores (engine.ai.severity_zones) in the
TID 1500 SR that engine.interop.export builds.

One group per zone A-F and one for the global score. Finding site (PS3.16 TID 1501 "Finding Site"
with its laterality modifier): the generic lung-zone concepts of PS3.16 CID 6171 "Zone of Lung",
SCT 281392002 / 281393007 / 281394001 Upper / Middle / Lower zone of lung, with laterality SCT
24028007 Right / 7771000 Left (the same concepts engine.interop.sr_ct_quant uses for the CT zones);
lobe concepts (e.g. SCT 45653009 Structure of upper lobe of lung) would claim an anatomy the thirds
do not follow. The global group's site is SCT 39607008 Lung. Neither PS3.16 nor SNOMED CT has a
concept for the Brixia score (Borghesi & Maroldi 2020), so the two measurement names use the private
scheme of engine.interop.export, which build_sr declares in the Coding Scheme Identification Sequence
(PS3.3 C.12.1.1.2). Each group names the scorer (TID 4019 algorithm name, version, parameters), and
its tracking identifier says that the zones are the thirds approximation of the Brixia zones.
"""
from __future__ import annotations

from typing import Any, Sequence

from pydicom.sr.codedict import codes

from engine.results import RESEARCH_USE, Severity

LOCAL_SCHEME = "99CHESTVIEW"   # same private scheme as engine.interop.export (declared in its SR header)
MANUFACTURER = "ChestView"     # as engine.interop.export.MANUFACTURER (TID 4019 algorithm manufacturer)
ZONES = {  # Brixia zone -> (laterality, lung zone), engine.ai.severity_zones.ZONE_NAMES order
    "A": ("right", "upper"), "B": ("right", "middle"), "C": ("right", "lower"),
    "D": ("left", "upper"), "E": ("left", "middle"), "F": ("left", "lower"),
}
ZONE_CODES = {"upper": ("281392002", "Upper zone of lung"), "middle": ("281393007", "Middle zone of lung"),
              "lower": ("281394001", "Lower zone of lung")}          # PS3.16 CID 6171 Zone of Lung
LATERALITY = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}
LUNG = ("39607008", "Lung")
APPROX = "thirds approximation"


def _hd():
    import highdicom as hd

    return hd


def _code(value: str, scheme: str, meaning: str):
    return _hd().sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def zone_site(zone: str):
    """TID 1501 Finding Site of a Brixia zone: lung zone (CID 6171) with laterality."""
    side, level = ZONES[zone]
    value, meaning = ZONE_CODES[level]
    lat = LATERALITY[side]
    return _hd().sr.FindingSite(anatomic_location=_code(value, "SCT", meaning),
                                laterality=_code(lat[0], "SCT", lat[1]))


def _algorithm(s: Severity):
    params = [f"method={s.method}", "Brixia zone score 0-3, global 0-18 (Borghesi & Maroldi 2020)",
              "zones = thirds of each lung's height, an approximation of the Brixia landmarks"]
    return _hd().sr.AlgorithmIdentification(name=s.model_name, version=s.model_version, parameters=params,
                                            manufacturer=MANUFACTURER)


def _group(identifier: str, s: Severity, site, name, value: float, source_images, comments: Sequence[str]):
    hd = _hd()
    grp = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier[:64]),
        finding_type=codes.DCM.Opacity, finding_sites=[site], algorithm_id=_algorithm(s),
        measurements=[hd.sr.Measurement(name=name, value=round(float(value), 4),
                                        unit=_code("{score}", "UCUM", "score"))],
        source_images=list(source_images) or None)
    for text in comments:
        grp[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return grp


def xray_zone_groups(s: Severity, source_images: Sequence[Any] = (), validity_text: str = "") -> list[Any]:
    """Measurement groups (highdicom MeasurementsAndQualitativeEvaluations) for the zone scores of
    ``s`` present in ``s.zone_scores`` and for ``s.brixia_global``; [] when it has no zone scores."""
    comments = [RESEARCH_USE] + ([validity_text] if validity_text else [])
    zone_name = _code("BRIXIA-ZONE", LOCAL_SCHEME, "Brixia zone score (0-3)")
    groups = [_group(f"Brixia zone {z} ({APPROX})", s, zone_site(z), zone_name, s.zone_scores[z], source_images,
                     comments)
              for z in ZONES if z in (s.zone_scores or {})]
    if groups and s.brixia_global is not None:
        groups.append(_group(f"Brixia global score ({APPROX})", s,
                             _hd().sr.FindingSite(anatomic_location=_code(LUNG[0], "SCT", LUNG[1])),
                             _code("BRIXIA-GLOBAL", LOCAL_SCHEME, "Brixia global score (0-18)"),
                             s.brixia_global, source_images, comments))
    return groups
