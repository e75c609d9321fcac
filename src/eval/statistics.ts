/** Statistics of feature vectors for realism (Fréchet distance) and diversity. Float64 throughout. */

export function mean(rows: readonly Float64Array[]): Float64Array {
  const d = rows[0]!.length;
  const m = new Float64Array(d);
  for (const r of rows) for (let i = 0; i < d; i++) m[i]! += r[i]!;
  return m.map((v) => v / rows.length);
}

/** Unbiased covariance (N − 1), as NumPy's np.cov. */
export function covariance(rows: readonly Float64Array[], mu = mean(rows)): Float64Array[] {
  const d = mu.length;
  const c = Array.from({ length: d }, () => new Float64Array(d));
  for (const r of rows) {
    for (let i = 0; i < d; i++) {
      const a = r[i]! - mu[i]!;
      for (let j = i; j < d; j++) c[i]![j]! += a * (r[j]! - mu[j]!);
    }
  }
  for (let i = 0; i < d; i++) {
    for (let j = i; j < d; j++) {
      c[i]![j]! /= rows.length - 1;
      c[j]![i] = c[i]![j]!;
    }
  }
  return c;
}

/** Eigenvalues and eigenvectors (columns) of a symmetric matrix, by cyclic Jacobi rotations. */
export function symmetricEigen(matrix: readonly Float64Array[]): {
  values: Float64Array;
  vectors: Float64Array[];
} {
  const n = matrix.length;
  const a = matrix.map((r) => Float64Array.from(r));
  const v = Array.from({ length: n }, (_, i) => {
    const r = new Float64Array(n);
    r[i] = 1;
    return r;
  });
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) off += a[i]![j]! ** 2;
    if (off < 1e-22) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = a[p]![q]!;
        if (Math.abs(apq) < 1e-300) continue;
        const theta = (a[q]![q]! - a[p]![p]!) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = a[k]![p]!;
          const akq = a[k]![q]!;
          a[k]![p] = c * akp - s * akq;
          a[k]![q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = a[p]![k]!;
          const aqk = a[q]![k]!;
          a[p]![k] = c * apk - s * aqk;
          a[q]![k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k]![p]!;
          const vkq = v[k]![q]!;
          v[k]![p] = c * vkp - s * vkq;
          v[k]![q] = s * vkp + c * vkq;
        }
      }
    }
  }
  return { values: Float64Array.from({ length: n }, (_, i) => a[i]![i]!), vectors: v };
}

function multiply(a: readonly Float64Array[], b: readonly Float64Array[]): Float64Array[] {
  const n = a.length;
  const m = b[0]!.length;
  return a.map((row) => {
    const out = new Float64Array(m);
    for (let k = 0; k < n; k++) {
      const x = row[k]!;
      if (x === 0) continue;
      const bk = b[k]!;
      for (let j = 0; j < m; j++) out[j]! += x * bk[j]!;
    }
    return out;
  });
}

/** The symmetric square root of a positive semi-definite matrix. */
export function sqrtm(matrix: readonly Float64Array[]): Float64Array[] {
  const { values, vectors } = symmetricEigen(matrix);
  const n = matrix.length;
  const scaled = vectors.map((row) => row.map((x, j) => x * Math.sqrt(Math.max(values[j]!, 0))));
  const vt = Array.from({ length: n }, (_, i) =>
    Float64Array.from({ length: n }, (_, j) => vectors[j]![i]!),
  );
  return multiply(scaled, vt);
}

/**
 * Fréchet distance between Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂):
 * ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), the symmetric form of Tr √(Σ₁Σ₂).
 */
export function frechetDistance(a: readonly Float64Array[], b: readonly Float64Array[]): number {
  const mu1 = mean(a);
  const mu2 = mean(b);
  const s1 = covariance(a, mu1);
  const s2 = covariance(b, mu2);
  const root = sqrtm(s1);
  const middle = multiply(multiply(root, s2), root);
  const { values } = symmetricEigen(middle);
  let trace = 0;
  for (let i = 0; i < mu1.length; i++) trace += s1[i]![i]! + s2[i]![i]!;
  let cross = 0;
  for (const v of values) cross += Math.sqrt(Math.max(v, 0));
  let d2 = 0;
  for (let i = 0; i < mu1.length; i++) d2 += (mu1[i]! - mu2[i]!) ** 2;
  return d2 + trace - 2 * cross;
}

/** Mean Euclidean distance over all pairs of rows. */
export function meanPairwiseDistance(rows: readonly Float64Array[]): number {
  let sum = 0;
  let count = 0;
  for (let i = 0; i < rows.length; i++) {
    for (let j = i + 1; j < rows.length; j++) {
      let d = 0;
      for (let k = 0; k < rows[i]!.length; k++) d += (rows[i]![k]! - rows[j]![k]!) ** 2;
      sum += Math.sqrt(d);
      count++;
    }
  }
  return count === 0 ? 0 : sum / count;
}
