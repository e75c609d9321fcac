import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { ClipTokenizer, cleanText } from '../src/tokenizers/clip.js';
import { golden, needsGolden } from './helpers.js';

interface Tokens {
  prompts: string[];
  unpadded: number[][];
  sd1_padded_77: number[][];
  sd2_padded_77: number[][];
}

test(
  'CLIP token ids equal transformers’ for every golden prompt (unpadded, SD1 and SD2 padding)',
  needsGolden(),
  async () => {
    const tokens = JSON.parse(readFileSync(golden('sd1-tiny', 'tokens.json'), 'utf8')) as Tokens;
    const sd1 = await ClipTokenizer.fromFolder(golden('sd1-tiny', 'sd-tiny', 'tokenizer'));
    const sd2 = await ClipTokenizer.fromFolder(golden('sd2-tiny', 'sd2-tiny', 'tokenizer'));
    assert.equal(sd1.padId, 49407);
    assert.equal(sd2.padId, 0);
    assert.ok(tokens.prompts.length >= 20);
    tokens.prompts.forEach((prompt, i) => {
      assert.deepEqual(
        sd1.encode(prompt, { pad: false, truncate: false }),
        tokens.unpadded[i],
        `unpadded ${JSON.stringify(prompt)}`,
      );
      assert.deepEqual(
        sd1.encode(prompt),
        tokens.sd1_padded_77[i],
        `sd1 ${JSON.stringify(prompt)}`,
      );
      assert.deepEqual(
        sd2.encode(prompt),
        tokens.sd2_padded_77[i],
        `sd2 ${JSON.stringify(prompt)}`,
      );
    });
  },
);

test('truncation keeps bos, the first 75 tokens and eos', needsGolden(), async () => {
  const t = await ClipTokenizer.fromFolder(golden('sd1-tiny', 'sd-tiny', 'tokenizer'));
  const long = Array.from({ length: 100 }, () => 'cat').join(' ');
  const ids = t.encode(long);
  assert.equal(ids.length, 77);
  assert.equal(ids[0], t.bosId);
  assert.equal(ids[76], t.eosId);
  assert.deepEqual(new Set(ids.slice(1, 76)), new Set([t.encode('cat', { pad: false })[1]]));
  assert.equal(t.decode(t.encode('A Painting', { pad: false }).slice(1, -1)), 'a painting');
});

test('text cleaning: NFC, HTML entities, quotes, ligatures, whitespace, lower case', () => {
  assert.equal(cleanText('  Cafe\u0301 &amp; cr&egrave;me\t\n ok  '), 'café & crème ok');
  assert.equal(cleanText('don\u2019t \u201cquote\u201d \ufb01ne'), 'don\'t "quote" fine');
  assert.equal(cleanText('MiXeD'), 'mixed');
});

test('a folder without vocab.json is a user error', async () => {
  await assert.rejects(
    ClipTokenizer.fromFolder('/nonexistent'),
    /vocab\.json and merges\.txt are required/,
  );
});
