export const punctuate = (text) => (/[.!?]$/.test(text) ? text : `${text}!`);
