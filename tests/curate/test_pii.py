"""IP addresses in text (fmjax.curate.pii): IPv4 and IPv6 found as whole tokens, private ones redacted,
loopback kept, look-alikes (versions, slices, times, MAC addresses, C++ names) left alone."""

import ipaddress

import pytest

from fmjax.curate import pii

ADDRESSES = ['192.168.1.20', '10.0.0.7', '81.2.3.200', '2001:db8::1', '2606:4700:4700::1111',
             'fe80::1ff:fe23:4567:890a', '::ffff:81.2.3.4', '2001:0db8:85a3:0000:0000:8a2e:0370:7334']
LOOPBACK = ['127.0.0.1', '0.0.0.0', '0:0:0:0:0:0:0:1']
SHORT = ['::1', '::', 'a[::2]']   # too short to tell from a slice: not counted, left as they are
NOT_ADDRESSES = ['v1.2.3.4.5', '10.0.0.256', '300.1.1.1', '1.2.3', 'a[1::2]', 'x[10::100]', '12:30:45',
                 'std::vector', '00:1A:2B:3C:4D:5E', 'a::b::c::d', 'ver-1.2.3.4x', *SHORT]


def _text(items):
  return ' '.join(f'({s}),' if i % 2 else f'at {s} now.' for i, s in enumerate(items))


def test_addresses_are_redacted_loopback_kept_and_look_alikes_left():
  assert all(ipaddress.ip_address(a) for a in ADDRESSES + LOOPBACK)   # the reference: real addresses
  text = _text(ADDRESSES + LOOPBACK + NOT_ADDRESSES)
  out, redacted, kept = pii.redact(text, '<IP>')
  assert (redacted, kept) == (len(ADDRESSES), len(LOOPBACK))
  assert out == _text(['<IP>'] * len(ADDRESSES) + LOOPBACK + NOT_ADDRESSES)


@pytest.mark.parametrize('context', ['{}', '[{}]:443', 'ip={};', 'http://{}/x', '"{}"', '{}.'])
def test_an_address_in_punctuation_is_found(context):
  for address in ('192.168.1.20', '2001:db8::42'):
    assert pii.redact(context.format(address), '<IP>') == (context.format('<IP>'), 1, 0)


def test_public_only_keeps_non_global_addresses_and_counts_them():
  text = _text(ADDRESSES + LOOPBACK)
  out, redacted, kept = pii.redact(text, '<IP>', public_only=True)
  public = [a for a in ADDRESSES if ipaddress.ip_address(a).is_global]
  assert public == ['81.2.3.200', '2606:4700:4700::1111', '::ffff:81.2.3.4'] and redacted == len(public)
  assert kept == len(ADDRESSES) - len(public) + len(LOOPBACK)
  assert out == _text([('<IP>' if a in public else a) for a in ADDRESSES] + LOOPBACK)
