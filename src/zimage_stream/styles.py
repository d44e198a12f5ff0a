"""The eight style presets of the contract, each turned into product-photography prompt text.

| preset | scene text appended to the user's prompt |
| --- | --- |
| ``minimal_white`` | seamless white background, soft even studio light, minimal |
| ``modern_home`` | modern home interior, window light, Scandinavian decor |
| ``studio_gradient`` | studio gradient backdrop, softbox key light, floor reflection |
| ``natural_outdoor`` | outdoors in daylight, greenery blurred in the background |
| ``luxury_dark`` | dark moody backdrop, rim lighting, glossy black surface |
| ``warm_lifestyle`` | warm lifestyle scene, golden-hour sunlight, cozy setting |
| ``festive`` | festive holiday setting, warm bokeh lights, ribbons and decorations |
| ``tech_futuristic`` | futuristic tech scene, blue and cyan neon, reflective surfaces |

Every preset ends with the same quality suffix, so a style changes the scene, not the
product's rendering quality.
"""

from __future__ import annotations

from typing import Literal, get_args

StyleName = Literal[
    "minimal_white",
    "modern_home",
    "studio_gradient",
    "natural_outdoor",
    "luxury_dark",
    "warm_lifestyle",
    "festive",
    "tech_futuristic",
]

STYLE_NAMES: tuple[str, ...] = get_args(StyleName)

_QUALITY = "professional e-commerce product photography, sharp focus, high detail, 8k"

STYLE_PROMPTS: dict[str, str] = {
    "minimal_white": (
        "placed on a clean seamless white background, soft even studio lighting, "
        "minimal composition, gentle contact shadow"
    ),
    "modern_home": (
        "styled in a modern home interior, natural window light, "
        "tasteful Scandinavian decor, light wood and linen textures"
    ),
    "studio_gradient": (
        "on a smooth studio gradient backdrop, softbox key light, "
        "subtle floor reflection, centered composition"
    ),
    "natural_outdoor": (
        "outdoors in natural daylight, greenery softly blurred in the background, "
        "shallow depth of field"
    ),
    "luxury_dark": (
        "on a dark moody backdrop, dramatic rim lighting, glossy black surface, premium luxury feel"
    ),
    "warm_lifestyle": (
        "in a warm lifestyle scene, golden-hour sunlight, cozy lived-in setting, soft warm tones"
    ),
    "festive": (
        "in a festive holiday setting, warm bokeh lights, ribbons and seasonal decorations, "
        "celebratory mood"
    ),
    "tech_futuristic": (
        "in a futuristic tech scene, cool blue and cyan neon accents, "
        "sleek reflective surfaces, high-tech atmosphere"
    ),
}

assert set(STYLE_PROMPTS) == set(STYLE_NAMES), "every preset needs prompt text"


def style_prompt(prompt: str, style: str | None) -> str:
    """The prompt the model sees: the user's prompt, then the preset's scene and quality text."""
    if style is None:
        return prompt
    try:
        scene = STYLE_PROMPTS[style]
    except KeyError:
        raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLE_NAMES)}") from None
    return f"{prompt.rstrip().rstrip('.,;')}, {scene}, {_QUALITY}"
