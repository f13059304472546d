"""
Frame modes: how Redis payloads map to WebSocket frames and back.
"""

from twisted.trial.unittest import SynchronousTestCase

from wsproxy.session import frames


class AutoModeTests(SynchronousTestCase):
    def test_down(self) -> None:
        """
        Valid UTF-8 becomes a text frame, anything else a binary frame.
        """
        down, up = frames.codec("auto")
        self.assertEqual(down(b'{"a":1}'), (b'{"a":1}', False))
        self.assertEqual(down("é".encode()), ("é".encode(), False))
        self.assertEqual(down(b"\xff\x00"), (b"\xff\x00", True))
        self.assertEqual(down(b""), (b"", False))

    def test_up_unchanged(self) -> None:
        down, up = frames.codec("auto")
        self.assertEqual(up(b"\x00x", True), b"\x00x")
        self.assertEqual(up(b"hi", False), b"hi")


class TaggedModeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        The tag byte carries the frame type both ways, whatever the bytes.
        """
        down, up = frames.codec("tagged")
        self.assertEqual(up(b"abc", True), b"babc")
        self.assertEqual(up(b"abc", False), b"tabc")
        self.assertEqual(down(b"babc"), (b"abc", True))
        self.assertEqual(down(b"tabc"), (b"abc", False))
        self.assertEqual(down(b"b"), (b"", True))

    def test_unsendable(self) -> None:
        """
        No tag, an unknown tag, or a text payload that is not UTF-8 cannot
        be sent.
        """
        down, up = frames.codec("tagged")
        for payload in (b"", b"xabc", b"t\xff", b"{}"):
            self.assertIsNone(down(payload), payload)


class FrameTests(SynchronousTestCase):
    def test_same_frame_as_autobahn(self) -> None:
        """
        frames.frame is byte for byte the frame Autobahn's prepareMessage
        builds, text and binary, at every length class.
        """
        from autobahn.websocket.protocol import PreparedMessage

        for n in (0, 1, 125, 126, 65535, 65536, 70000):
            for binary in (False, True):
                message = b"m" * n
                self.assertEqual(
                    frames.frame(message, binary),
                    PreparedMessage(message, binary, False, False).payloadHybi,
                )
