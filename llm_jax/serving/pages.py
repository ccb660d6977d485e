"""The page pool's bookkeeping on the host: which pages are free, who holds each, and the prefix cache.

Page 0 is the null page (attention.PageTable): never handed out. A page is held by the sequences whose page tables
list it (`refs`). A full page of computed tokens can be registered in the prefix cache under the hash of every
token up to its end (a chain: the page's tokens and its predecessor's hash), so a later sequence whose prompt
starts with the same tokens takes the page instead of recomputing it. A cached page nobody holds stays readable
until the pool needs it: it is evicted least recently used first, and only then.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence


def page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
  """The prefix-cache key of a full page: its tokens after the prefix that `parent` (b'' for page 0) keys."""
  digest = hashlib.blake2b(parent, digest_size=16)
  digest.update(b''.join(int(t).to_bytes(4, 'little', signed=False) for t in tokens))
  return digest.digest()


class PagePool:

  def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
    if num_pages < 2:
      raise ValueError(f'a page pool needs at least 2 pages (one is the null page), got {num_pages}')
    self.num_pages = num_pages
    self.page_size = page_size
    self.prefix_caching = prefix_caching
    self._free = collections.deque(range(1, num_pages))
    self._refs = [0] * num_pages
    self._hash_of: dict[int, bytes] = {}  # cached page -> its key
    self._page_of: dict[bytes, int] = {}  # key -> cached page
    self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld; LRU first
    self.hit_tokens = 0  # prompt tokens served from the cache, since start

  @property
  def usable(self) -> int:
    """Pages a sequence can hold (all but the null page)."""
    return self.num_pages - 1

  @property
  def available(self) -> int:
    """Pages that can be handed out now: free ones and cached ones nobody holds."""
    return len(self._free) + len(self._idle)

  @property
  def used(self) -> int:
    """Pages held by some sequence."""
    return self.usable - self.available

  def allocate(self) -> int | None:
    """A page for one holder, or None when every page is held."""
    if self._free:
      page = self._free.popleft()
    elif self._idle:
      page, _ = self._idle.popitem(last=False)
      del self._page_of[self._hash_of.pop(page)]
    else:
      return None
    self._refs[page] = 1
    return page

  def release(self, pages: Sequence[int]) -> None:
    """Drops one hold of each page; unheld pages go back (cached ones stay readable until evicted)."""
    for page in pages:
      self._refs[page] -= 1
      assert self._refs[page] >= 0, page
      if self._refs[page] == 0:
        if page in self._hash_of:
          self._idle[page] = None
        else:
          self._free.append(page)

  def lookup(self, tokens: Sequence[int], max_pages: int) -> tuple[list[int], list[bytes]]:
    """The cached pages (held once more each) that hold the first full pages of `tokens`, at most max_pages,
    and their keys."""
    pages, keys, parent = [], [], b''
    if not self.prefix_caching:
      return pages, keys
    size = self.page_size
    for i in range(min(max_pages, len(tokens) // size)):
      key = page_hash(parent, tokens[i * size:(i + 1) * size])
      page = self._page_of.get(key)
      if page is None:
        break
      if self._refs[page] == 0:
        del self._idle[page]
      self._refs[page] += 1
      pages.append(page)
      keys.append(key)
      parent = key
    self.hit_tokens += len(pages) * size
    return pages, keys

  def register(self, page: int, parent: bytes, tokens: Sequence[int]) -> bytes:
    """Puts a full page of computed tokens in the cache (if caching and its key is new); returns its key."""
    key = page_hash(parent, tokens)
    if self.prefix_caching and key not in self._page_of and page not in self._hash_of:
      self._page_of[key] = page
      self._hash_of[page] = key
    return key
