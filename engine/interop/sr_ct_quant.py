"""TID 1501 measurement groups for the CT HU quantification (engine.ai.ct_quant) in the TID 1500 SR.

One group per lung (right, left) and per zone (upper/middle/lower third of each lung), plus one
for both lungs with the CT severity score. Each group: finding site (SCT Right lung 3341006 / Left
lung 44029006, or SCT Upper/Middle/Lower zone of lung 281392002/281393007/281394001 with laterality
SCT Right 24028007 / Left 7771000, PS3.16 TID 1501 row 7 "Finding Site" with TID 1501's laterality
modifier), volume (SCT 118565006, UCUM mL), and the HU class fractions (UCUM %). Ground glass uses
DCM 112120, consolidation SCT 95436008, emphysema SCT 87433001; "normally aerated" and the score
have no standard concept and use the private scheme declared by engine.interop.export. The method
and its HU thresholds go in the TID 4019 algorithm parameters.
"""
from __future__ import annotations

from typing import Any, Sequence

from pydicom.sr.codedict import codes

from engine.results import RESEARCH_USE, CTQuantification, CTZoneStats

LOCAL_SCHEME = "99CHESTVIEW"   # same private scheme as engine.interop.export (declared in its SR header)
ZONE_CODES = {"upper": ("281392002", "Upper zone of lung"), "middle": ("281393007", "Middle zone of lung"),
              "lower": ("281394001", "Lower zone of lung")}
LUNG_CODES = {"right": ("3341006", "Right lung"), "left": ("44029006", "Left lung"), "both": ("39607008", "Lung")}
LATERALITY = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}


def _hd():
    import highdicom as hd

    return hd


def _code(value: str, scheme: str, meaning: str):
    return _hd().sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def _site(z: CTZoneStats):
    hd = _hd()
    if z.zone in ZONE_CODES:
        lat = LATERALITY.get(z.lung)
        value, meaning = ZONE_CODES[z.zone]
        return hd.sr.FindingSite(anatomic_location=_code(value, "SCT", meaning),
                                 laterality=_code(lat[0], "SCT", lat[1]) if lat else None)
    v, m = LUNG_CODES[z.lung]
    return hd.sr.FindingSite(anatomic_location=_code(v, "SCT", m))


def _measurements(z: CTZoneStats) -> list[Any]:
    hd = _hd()
    pct, ml = _code("%", "UCUM", "Percent"), _code("mL", "UCUM", "milliliter")
    ggo = _code("112120", "DCM", "Ground glass opacity")
    cons = _code("95436008", "SCT", "Lung consolidation")
    rows = [
        (_code("118565006", "SCT", "Volume"), z.volume_ml, ml),
        (_code("EMPH-PCT", LOCAL_SCHEME, "Emphysema-range (< -950 HU) % of volume"), z.emphysema_percent, pct),
        (_code("NORMAL-PCT", LOCAL_SCHEME, "Normally aerated (-950 to -700 HU) % of volume"), z.normal_percent, pct),
        (_code("GGO-PCT", LOCAL_SCHEME, "Ground glass (-700 to -300 HU) % of volume"), z.ggo_percent, pct),
        (_code("CONS-PCT", LOCAL_SCHEME, "Consolidation (-300 to +50 HU) % of volume"), z.consolidation_percent, pct),
        (_code("INVOLVED-PCT", LOCAL_SCHEME, "Ground glass + consolidation % of volume"), z.involved_percent, pct),
        (ggo, z.ggo_ml, ml),
        (cons, z.consolidation_ml, ml),
    ]
    return [hd.sr.Measurement(name=n, value=round(float(v), 3), unit=u) for n, v, u in rows]


def _group(identifier: str, q: CTQuantification, site, measurements, source_images, comments: Sequence[str]):
    hd = _hd()
    params = [f"{k}={v}" for k, v in q.thresholds.items()]
    grp = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier[:64]),
        finding_type=_code("39607008", "SCT", "Lung"), finding_sites=[site],
        algorithm_id=hd.sr.AlgorithmIdentification(name=q.method, version=q.version, parameters=params or None),
        measurements=measurements, source_images=list(source_images) or None)
    for text in comments:
        grp[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return grp


def ct_quant_groups(q: CTQuantification, source_images: Sequence[Any] = (), validity_text: str = "") -> list[Any]:
    """Measurement groups (highdicom MeasurementsAndQualitativeEvaluations) for ``q``."""
    hd = _hd()
    base = [RESEARCH_USE] + ([validity_text] if validity_text else [])
    if q.is_phantom:
        base.append("Synthetic demo phantom, not a patient.")
    groups = []
    for z in list(q.lungs) + list(q.zones):
        ident = f"CT HU quantification {z.lung} lung" + ("" if z.zone == "whole" else f" {z.zone} zone")
        groups.append(_group(ident, q, _site(z), _measurements(z), source_images,
                             base if z.zone == "whole" else [RESEARCH_USE]))
    score = _code("CT-SEV-ZONES", LOCAL_SCHEME, "CT severity score (0-25) on zones, approximation")
    points = [hd.sr.Measurement(name=_code(f"CT-SEV-R{i + 1}", LOCAL_SCHEME, f"CT severity points: {r.name}"),
                                value=int(r.points), unit=_code("{score}", "UCUM", "score"))
              for i, r in enumerate(q.severity_regions)]
    total = _measurements(q.total) + [hd.sr.Measurement(name=score, value=int(q.severity_score),
                                                        unit=_code("{score}", "UCUM", "score"))] + points
    groups.append(_group("CT HU quantification both lungs", q, _site(q.total), total, source_images,
                         base + [q.severity_note]))
    return groups
