"""Tests of the chat side's pieces that need no Discord: markers, audit drafts, the process."""
