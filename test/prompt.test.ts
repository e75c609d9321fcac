import assert from 'node:assert/strict';
import test from 'node:test';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { ClipTokenizer } from '../src/tokenizers/index.js';
import { parsePromptAttention, promptChunks } from '../src/tokenizers/prompt.js';
import { golden, needsGolden } from './helpers.js';

const close = (a: number, b: number) => Math.abs(a - b) < 1e-9;

test('A1111 emphasis parses as its own documentation says', () => {
  // The examples of AUTOMATIC1111's parse_prompt_attention docstring, with its values.
  const cases: [string, [string, number][]][] = [
    ['normal text', [['normal text', 1]]],
    [
      'an (important) word',
      [
        ['an ', 1],
        ['important', 1.1],
        [' word', 1],
      ],
    ],
    ['(unbalanced', [['unbalanced', 1.1]]],
    ['\\(literal\\]', [['(literal]', 1]]],
    ['(unnecessary)(parens)', [['unnecessaryparens', 1.1]]],
    [
      'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
      [
        ['a ', 1],
        ['house', 1.5730000000000004],
        [' ', 1.1],
        ['on', 1],
        [' a ', 1.1],
        ['hill', 0.55],
        [', sun, ', 1.1],
        ['sky', 1.4641000000000006],
        ['.', 1.1],
      ],
    ],
    ['', [['', 1]]],
    [
      'a BREAK b',
      [
        ['a', 1],
        ['BREAK', -1],
        ['b', 1],
      ],
    ],
    ['[faded]', [['faded', 1 / 1.1]]],
  ];
  for (const [text, expected] of cases) {
    const got = parsePromptAttention(text);
    assert.equal(got.length, expected.length, `${text}: ${JSON.stringify(got)}`);
    got.forEach(([t, w], i) => {
      assert.equal(t, expected[i]![0], text);
      assert.ok(close(w, expected[i]![1]), `${text}: ${t} ${w} ≠ ${expected[i]![1]}`);
    });
  }
});

test(
  'long prompts: chunks of 75 tokens, a comma within 20 tokens moves the tail, BREAK cuts',
  needsGolden(),
  async () => {
    const tokenizer = await ClipTokenizer.fromFolder(golden('sd1-tiny', 'sd-tiny', 'tokenizer'));
    const one = tokenizer.tokenize('cat');
    assert.equal(one.length, 1);
    const cat = one[0]!;
    const comma = tokenizer.commaId!;
    // 100 single-token words: 75 in the first chunk, 25 in the second.
    const plain = promptChunks(tokenizer, Array.from({ length: 100 }, () => 'cat').join(' '));
    assert.equal(plain.ids.length, 2);
    assert.deepEqual(plain.ids[0], [
      tokenizer.bosId,
      ...new Array<number>(75).fill(cat),
      tokenizer.eosId,
    ]);
    assert.deepEqual(plain.ids[1]!.slice(0, 27), [
      tokenizer.bosId,
      ...new Array<number>(25).fill(cat),
      tokenizer.eosId,
    ]);
    assert.equal(plain.ids[1]!.length, 77);
    // A comma at position 60: when the chunk fills, the 14 tokens after it move on.
    const words = [...new Array<string>(60).fill('cat'), ',', ...new Array<string>(40).fill('cat')];
    const backtracked = promptChunks(tokenizer, words.join(' '));
    assert.equal(backtracked.ids.length, 2);
    assert.equal(backtracked.ids[0]!.indexOf(tokenizer.eosId), 1 + 61); // 60 cats and the comma
    assert.equal(backtracked.ids[0]![61], comma);
    assert.equal(backtracked.ids[1]!.filter((id) => id === cat).length, 40);
    // Weights follow their tokens; specials and padding weigh 1.
    const weighted = promptChunks(tokenizer, 'a (red:1.5) cat BREAK [blue] dog');
    assert.equal(weighted.ids.length, 2);
    assert.deepEqual(weighted.weights[0]!.slice(0, 5), [1, 1, 1.5, 1, 1]);
    assert.ok(close(weighted.weights[1]![1]!, 1 / 1.1));
  },
);

test(
  'emphasis: token states times their weights, rescaled to the unweighted mean; long prompts reach the UNet',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
      cacheDir: false,
    });
    const plain = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, false, 'plain');
    const weighted = await pipe.encodePrompts(
      ['a (red:1.5) circle'],
      undefined,
      1,
      0,
      false,
      'a1111',
    );
    // The same tokens: work out the weighted states by hand from the plain ones, in float64.
    const z = plain.embeddings;
    const [, tokens, width] = z.shape as [number, number, number];
    const weights = new Array<number>(tokens).fill(1);
    weights[2] = 1.5; // start, "a", "red", ...
    let before = 0;
    let after = 0;
    for (let t = 0; t < tokens; t++)
      for (let k = 0; k < width; k++) {
        before += z.data[t * width + k]!;
        after += z.data[t * width + k]! * weights[t]!;
      }
    for (let t = 0; t < tokens; t++)
      for (let k = 0; k < width; k++) {
        const expected = (z.data[t * width + k]! * weights[t]! * before) / after;
        assert.ok(
          Math.abs(weighted.embeddings.data[t * width + k]! - expected) < 1e-5,
          `token ${t}`,
        );
      }
    // No emphasis and a short prompt: A1111 syntax gives exactly the plain encoding.
    const same = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, false, 'a1111');
    assert.deepEqual(same.embeddings.data, plain.embeddings.data);

    // 120 tokens against an empty negative prompt: both become two chunks (154 tokens).
    const long = Array.from({ length: 120 }, () => 'red').join(' ');
    const both = await pipe.encodePrompts([long], [''], 1, 0, true, 'a1111');
    assert.deepEqual(both.embeddings.shape, [2, 154, width]);
    const result = await pipe.generate({
      prompt: long,
      steps: 2,
      guidance: 5,
      seed: 1,
      promptSyntax: 'a1111',
    });
    assert.deepEqual(result.images.shape.slice(1), [64, 64, 3]);
    await pipe.release();
  },
);
