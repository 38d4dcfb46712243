"""Instruction pools (data): the prompts a recipe samples and pairs with a clip.

`DESTA_INSTRUCTIONS` are short, open DeSTA-style requests about one clip: description, sound events,
speech content and speaker attributes, background, timing, counting, mood. They are written for this
project (DeSTA2.5's own pool is not released) and phrased so that they make sense for any clip, with or
without speech, because a recipe draws them without looking at the clip. Order matters: recipes pick by
index, so append new instructions at the end to keep existing corpora reproducible.
"""

from __future__ import annotations

DESTA_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the audio in detail.",
    "What can you hear?",
    "Summarize what happens in this clip.",
    "Is there speech? What is said?",
    "List the sounds you hear, in the order they occur.",
    "Describe the background of this recording.",
    "What is the most prominent sound in this clip?",
    "How many different sounds can you hear? Name them.",
    "Write a one-sentence caption for this audio.",
    "Where might this recording have been made?",
    "Describe the acoustic environment and the recording quality.",
    "What happens first, and what happens last?",
    "Is the audio clean or noisy? Explain.",
    "Describe the mood or atmosphere of this clip.",
    "If someone speaks, describe the speaker's voice.",
    "When does each sound start and stop?",
    "Give a short title for this recording.",
    "Explain what is going on in this audio to someone who cannot hear it.",
    "Are there any sounds that overlap? Which ones?",
    "Describe this audio in three short bullet points.",
    "What kind of sound source could produce what you hear?",
    "Is there anything unusual in this recording?",
    "How long does the main sound last?",
    "Describe the loudness and pitch of the sounds in this clip.",
    "What would be a good tag or label for this audio?",
    "Briefly describe the audio.",
    "Could this clip come from a quiet place or a busy one? Why?",
    "Describe every sound event you notice, with its timing.",
    "What is the speaker talking about, if anyone speaks?",
    "Write a detailed caption of this audio clip for a sound archive.",
)
